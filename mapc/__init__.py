"""mapc: a declarative, spec-driven compiler for LLM checkpoint conversion.

Model families are described in spec files (``specs/*.map``); conversions between checkpoint
formats and parallel layouts are compiled from them. See README.md and docs/.
"""
__version__ = "0.1.0"

from mapc.errors import MapcError, SpecError  # noqa: E402


def __getattr__(name):
    # The API imports the runtime lazily so that `import mapc` stays cheap.
    if name in ("convert", "compile_spec", "inspect", "verify", "plan_conversion",
                "plan_convert"):
        from mapc import api
        return getattr(api, name)
    raise AttributeError(name)


__all__ = ["MapcError", "SpecError", "convert", "compile_spec", "inspect", "verify",
           "plan_conversion", "plan_convert", "__version__"]
