"""One fresh `CompressedCache` per `generate` call: `CompressedCache.factory(model, ...)` returns a
`CacheFactory`; `factory.installed(model)` makes every `model.generate` call that passes no cache
(a pipeline's, for instance) use a new one. A cache holds one conversation: sharing one object
between unrelated calls would continue the first prompt's state into the second."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    from kvsplice.cache import CompressedCache


class CacheFactory:
    """Makes one fresh `CompressedCache` per call. A cache holds one conversation; a pipeline calls
    `generate` once per prompt (or batch), so it needs a new cache each time:

        factory = CompressedCache.factory(model, v_geometry=v, k_geometry=k, sink=1)
        out = model.generate(**batch, cache=factory())
        with factory.installed(model):            # every generate() without a cache gets factory()
            texts = pipeline("text-generation", model=model, tokenizer=tok)(["a", "b"])
    """

    def __init__(self, make: Callable[[], "CompressedCache"]) -> None:
        self.make = make
        make()  # fail now (bad geometry, wrong model) rather than inside the first generate

    def __call__(self) -> "CompressedCache":
        return self.make()

    def installed(self, model: Any) -> "_Installed":
        return _Installed(model, self)


class _Installed:
    """Context manager: `model.generate` gets `cache=factory()` when the call passes none."""

    def __init__(self, model: Any, factory: CacheFactory) -> None:
        self.model, self.factory = model, factory

    def __enter__(self) -> Any:
        model, factory = self.model, self.factory
        original = model.generate  # the bound method

        def generate(*args: Any, **kwargs: Any) -> Any:
            if kwargs.get("cache") is None and kwargs.get("past_key_values") is None:
                kwargs["cache"] = factory()
            return original(*args, **kwargs)

        self.had_own = "generate" in vars(model)
        self.previous = vars(model).get("generate")
        model.generate = generate
        return model

    def __exit__(self, *exc: Any) -> None:
        if self.had_own:
            self.model.generate = self.previous
        else:
            del self.model.generate
