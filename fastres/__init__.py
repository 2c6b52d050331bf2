"""fastres: a high-throughput trainer for ResNet-family classifiers on CIFAR-10.

The names most scripts need, importable from here:

    import fastres
    cfg = fastres.resolve(fastres.preset("smoke"), "cpu")
    data = fastres.load_cifar("data")
    model = fastres.create_model("resnet20")
    opts = fastres.LoaderOptions.for_dataset("cifar10", batch_size=512, train=True)
    loader = fastres.build_loader("tensor", data.train.images, data.train.labels, opts)

and the subpackages: fastres.config, .data, .models, .pipelines, .engine, .kernels, .bench,
.testing (small CIFAR files in the official format for tests and examples), .errors.

`import fastres` itself imports nothing heavy: each name is imported from its module on
first use (PEP 562 module `__getattr__`), so a tool that needs only the config does not pay
for torch.
"""
import importlib

__version__ = "0.1.0"

# name -> the module that defines it
_EXPORTS = {
    **dict.fromkeys(("Config", "preset", "list_presets", "override", "resolve", "validate"),
                    "fastres.config"),
    **dict.fromkeys(("CifarData", "load_cifar", "download_cifar", "channel_mean_std"),
                    "fastres.data"),
    **dict.fromkeys(("create_model", "list_models", "register_model"), "fastres.models"),
    **dict.fromkeys(("Augment", "LoaderOptions", "build_loader", "check_loader",
                     "available_loaders"), "fastres.pipelines"),
    **dict.fromkeys(("train", "evaluate", "build", "RunResult", "TrainStep", "Session",
                     "run_training"), "fastres.engine"),
    **dict.fromkeys(("FastresError", "ConfigError", "DataError"), "fastres.errors"),
}
_SUBMODULES = ("bench", "config", "data", "distributed", "engine", "errors", "kernels",
               "models", "pipelines", "testing")

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
    elif name in _SUBMODULES:
        value = importlib.import_module(f"{__name__}.{name}")
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value      # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS) | set(_SUBMODULES))
