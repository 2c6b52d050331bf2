"""The public Python surface: what `fastres` and its subpackages export, what importing them
costs, and the Loader-protocol check that train() runs on its loaders."""
import ast
import importlib
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import fastres
from fastres.errors import ConfigError
from fastres.pipelines import LoaderOptions, build_loader, check_loader

ROOT = Path(__file__).resolve().parents[1]
PUBLIC = ["fastres", "fastres.bench", "fastres.config", "fastres.data", "fastres.engine",
          "fastres.errors", "fastres.kernels",
          "fastres.models", "fastres.pipelines", "fastres.testing"]


@pytest.mark.parametrize("name", PUBLIC)
def test_every_exported_name_imports(name):
    module = importlib.import_module(name)
    exported = module.__all__
    assert len(exported) == len(set(exported)), f"{name}.__all__ repeats a name"
    missing = [n for n in exported if not hasattr(module, n)]
    assert not missing, f"{name}.__all__ names what it does not define: {missing}"
    namespace = {}
    exec(f"from {name} import *", namespace)
    assert set(exported) <= set(namespace)


def test_top_level_names_are_the_modules_own():
    for name, module in fastres._EXPORTS.items():
        assert getattr(fastres, name) is getattr(importlib.import_module(module), name)
    assert fastres.models is importlib.import_module("fastres.models")
    assert set(fastres.__all__) <= set(dir(fastres))
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        fastres.nothing


def _fresh(code: str) -> str:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True, cwd=ROOT).stdout


def test_import_fastres_is_cheap():
    # Cheap means: no torch, numpy or model zoo until a name that needs them is used.
    # (Times are not asserted; `python -X importtime -c "import fastres"` shows them.)
    out = _fresh("import sys, fastres; cfg = fastres.preset('smoke'); "
                 "print(sorted(m for m in sys.modules if m.split('.')[0] in "
                 "('torch', 'numpy', 'triton', 'torchvision') or m.startswith('fastres.')))")
    assert out.strip() == "['fastres.config', 'fastres.errors']"


def test_the_library_never_imports_tools():
    # fastres/__main__.py (`python -m fastres`) is the one allowed door into the CLI.
    offenders = []
    for folder in ("fastres", "pipelines", "kernels"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            if path == ROOT / "fastres" / "__main__.py":
                continue
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                         else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
                offenders += [f"{path.relative_to(ROOT)}:{node.lineno}" for n in names
                              if n == "fastres.tools" or n.startswith("fastres.tools.")]
    assert not offenders


# --------------------------------------------------------------------------- check_loader

class Complete:
    batch_size, num_examples = 4, 8

    def __iter__(self):
        return iter([])

    def __len__(self):
        return 2

    def set_epoch(self, epoch):
        pass

    def sample(self, n):
        return torch.zeros(n, 3, 2, 2)


def test_check_loader_accepts_the_protocol():
    check_loader(Complete())
    check_loader(Complete(), "test")
    x = np.zeros((16, 8, 8, 3), np.uint8)
    loader = build_loader("tensor", x, np.zeros(16, np.int64),
                          LoaderOptions.for_dataset("cifar10", batch_size=4, train=True))
    check_loader(loader, "train")


def test_check_loader_names_what_a_dataloader_lacks():
    dl = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.zeros(8, 3)),
                                     batch_size=4)
    with pytest.raises(ConfigError) as e:
        check_loader(dl, "train")
    msg = str(e.value)
    assert "the train loader (DataLoader) lacks num_examples, set_epoch, sample" in msg
    assert "build_loader" in msg and "\n" not in msg
    check_loader(dl, "test")          # iterable with a batch_size: enough for evaluation


def test_check_loader_errors():
    with pytest.raises(ConfigError, match=r"test loader \(list\) lacks batch_size"):
        check_loader([(torch.zeros(1), torch.zeros(1))], "test")
    with pytest.raises(ConfigError, match="is a class, not a loader object"):
        check_loader(Complete)
    broken = Complete()
    broken.sample = "not callable"
    with pytest.raises(ConfigError, match="lacks sample"):
        check_loader(broken)
    for bad in (0, 2.5, None):
        zero = Complete()
        zero.batch_size = bad
        with pytest.raises(ConfigError, match="batch_size=.*positive whole number"):
            check_loader(zero)
    with pytest.raises(ValueError, match="role"):
        check_loader(Complete(), "eval")
