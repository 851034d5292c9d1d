"""Where the files mlsched ships are: beside the sources in a checkout, else in the package.

`pip install .` puts bpf/mlsched.bpf.o (with its .enums list) in loader/bpf/ and the bundled
model model_dir/model_path in loader/model/ (pyproject.toml); a checkout uses its own bpf/ and
model_dir/, so `make bpf` is seen at once. --bpf-obj and --model name any other. Every default
path of every command and tool comes from here, so an installed one finds its files from any
working directory.
"""

from pathlib import Path

PACKAGE = Path(__file__).resolve().parent
CHECKOUT = PACKAGE.parent  # the repository; site-packages when installed
IN_CHECKOUT = (CHECKOUT / "bpf" / "mlsched.bpf.c").is_file()

BPF_OBJ = (CHECKOUT / "bpf" if IN_CHECKOUT else PACKAGE / "bpf") / "mlsched.bpf.o"
BUNDLED_MODEL = CHECKOUT / "model_dir" / "model_path" if IN_CHECKOUT else PACKAGE / "model"
BUILD_HINT = "run `make bpf`" if IN_CHECKOUT else "build it with `make bpf` before `pip install .`"
# A checkout's alone (not package data): the tests' dummy and the benchmarks' results.
DUMMY_MODEL = CHECKOUT / "tests" / "models" / "dummy"
BENCH_RESULTS = CHECKOUT / "bench-results" if IN_CHECKOUT else None


def shown(path: Path) -> str:
    """A short name for reports: relative to the checkout when inside one, `bundled` for the
    installed package's model (its site-packages path fills a table row), else as given."""
    if IN_CHECKOUT:
        try:
            return str(path.resolve().relative_to(CHECKOUT))
        except ValueError:
            pass
    elif path.resolve() == BUNDLED_MODEL:
        return "bundled"
    return str(path)
