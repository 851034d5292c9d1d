"""Where the files mlsched ships are: beside the sources in a checkout, else in the package.

`pip install .` puts bpf/mlsched.bpf.o (with its .enums list) in loader/bpf/ and the bundled
model model_dir/model_path in loader/model/ (pyproject.toml); a checkout uses its own bpf/ and
model_dir/, so `make bpf` is seen at once. --bpf-obj and --model name any other.
"""

from pathlib import Path

PACKAGE = Path(__file__).resolve().parent
CHECKOUT = PACKAGE.parent
IN_CHECKOUT = (CHECKOUT / "bpf" / "mlsched.bpf.c").is_file()

BPF_OBJ = (CHECKOUT / "bpf" if IN_CHECKOUT else PACKAGE / "bpf") / "mlsched.bpf.o"
BUNDLED_MODEL = CHECKOUT / "model_dir" / "model_path" if IN_CHECKOUT else PACKAGE / "model"
BUILD_HINT = "run `make bpf`" if IN_CHECKOUT else "build it with `make bpf` before `pip install .`"
