"""TensorRT versions and the build path each one takes.

Two build paths exist because TensorRT changed how precision is chosen:

* **weak** (8.5 to 10.x): the network is weakly typed; precision is requested with builder flags
  (FP16, INT8) and int8 scales come from an implicit calibrator.
* **strong** (10.12 and later; the only mode in 11.x): the network is strongly typed; every tensor's
  type follows from the ONNX graph, so fp16 means an ONNX model cast on the host and int8 means Q/DQ
  nodes inserted on the host. Builder precision flags are not used.

10.12 is the cut-over the product's target matrix names (issue 5). Strong typing exists as an
option since 10.0; below 10.12 we keep the weak path, which is also what every JetPack's TensorRT
(8.5 to 10.x) takes, so a Jetson and an x86 server of the same TensorRT build the same way. Not yet
verified on a real TensorRT: no machine of the team has one.
"""

from __future__ import annotations

import importlib.metadata
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Literal

from xpdeploy.errors import BuildError, MissingDependencyError
from xpdeploy.fileio import read_text_or_none

BuildPath = Literal["weak", "strong"]
Precision = Literal["fp32", "fp16", "int8", "best"]

#: Oldest TensorRT we build with (JetPack 5.1's 8.5.2): older ones lack set_memory_pool_limit's
#: pools, the engine inspector's JSON output and the ONNX opset 17 importer our exports use.
MIN_VERSION = (8, 5, 0)
#: First TensorRT built on the strongly typed path.
STRONG_FROM = (10, 12, 0)
#: First TensorRT whose fp16 ViTs we trust to keep LayerNorm accurate without pinning it (below).
LAYERNORM_SAFE_FROM = (10, 0, 0)

_VERSION_RE = re.compile(r"^\s*(\d+)\.(\d+)(?:\.(\d+))?(?:\.\d+)*(?:[.+-].*)?\s*$")


@dataclass(frozen=True, order=True)
class TrtVersion:
    """A TensorRT version; the fourth (build) number of "10.3.0.26" is dropped, it never matters."""

    major: int
    minor: int
    patch: int = 0

    @classmethod
    def parse(cls, text: str) -> TrtVersion:
        """Parse "10.3.0.26", "8.5.2.2", "10.12" or "11.0.0+cuda13" (``tensorrt.__version__``)."""
        m = _VERSION_RE.match(text)
        if m is None:
            raise BuildError(f"cannot read TensorRT version '{text}'; expected MAJOR.MINOR[.PATCH]")
        return cls(int(m.group(1)), int(m.group(2)), int(m.group(3) or 0))

    def as_tuple(self) -> tuple[int, int, int]:
        return (self.major, self.minor, self.patch)

    def __str__(self) -> str:
        return f"{self.major}.{self.minor}.{self.patch}"


def detect(trt_module: ModuleType | None = None) -> TrtVersion | None:
    """The installed TensorRT's version, or None when ``import tensorrt`` fails.

    ``trt_module`` lets a caller (or a test) hand in the module instead of importing it.
    """
    if trt_module is None:
        try:
            import tensorrt as trt_module  # type: ignore[import-not-found, no-redef]
        except ImportError:
            return None
    return TrtVersion.parse(str(trt_module.__version__))


def build_path(version: TrtVersion) -> BuildPath:
    """"strong" from 10.12 on (and for all of 11.x), "weak" from 8.5 up to 10.11.

    Raises :class:`BuildError` below 8.5, naming the version found and the minimum.
    """
    if version.as_tuple() < MIN_VERSION:
        minimum = ".".join(map(str, MIN_VERSION[:2]))
        raise BuildError(
            f"TensorRT {version} is too old: xpdeploy needs TensorRT >= {minimum} "
            "(JetPack 5.1 or later, or pip install 'xpdeploy[tensorrt]')"
        )
    return "strong" if version.as_tuple() >= STRONG_FROM else "weak"


def needs_layernorm_fp32(version: TrtVersion, precision: Precision) -> bool:
    """Whether LayerNorm layers must be pinned to fp32 for this version and precision.

    Rule: pin on the weak path below TensorRT 10.0 whenever reduced precision is allowed (fp16,
    int8, best); never for fp32, never from 10.0 on, never on the strong path.

    Why: a ViT's LayerNorm computes a variance (a mean of squares) over activations that reach
    hundreds after the residual additions; squared, they can pass fp16's maximum of 65504 and the
    norm returns inf/NaN. TensorRT 8.5 imports ONNX LayerNormalization as ReduceMean/Sub/Pow/Sqrt/
    Div, each free to run in fp16, and warns "Running layernorm after self-attention in FP16 may
    cause overflow". 8.6 added a normalization layer for opset-17 graphs (ours), whose precision
    NVIDIA's maintainers say the optimiser handles, yet users still report that warning and
    fp16 accuracy loss on 8.6 and 10.x (NVIDIA/TensorRT issues 2781, 3692, 4111). Our rule is the
    conservative reading, to be confirmed on a device: pin below 10.0, with PREFER (not OBEY)
    precision constraints so a build never fails over it; the cost is small (norms are
    memory-bound). Int8 and best count too ("best" may pick fp16 for the norms). On the strong
    path layer precisions cannot be set: the host-side fp16 cast keeps the norms in fp32.
    """
    if precision == "fp32":
        return False
    if build_path(version) == "strong":
        return False
    return version.as_tuple() < LAYERNORM_SAFE_FROM


TRT_INSTALL_HINT = (
    "install TensorRT's Python package: pip install 'xpdeploy[tensorrt]' on an x86 GPU machine, "
    "or use the JetPack image on Jetson (see docker/)"
)


def import_tensorrt(purpose: str) -> ModuleType:
    """``import tensorrt``, or a one-line MissingDependencyError saying ``purpose`` and the fix."""
    try:
        import tensorrt
    except ImportError as exc:
        raise MissingDependencyError(
            f"{purpose} needs TensorRT, which is not installed ({exc}); {TRT_INSTALL_HINT}"
        ) from exc
    return tensorrt


_L4T_RE = re.compile(r"R(\d+)\s*\(\w+\),\s*REVISION:\s*(\d+(?:\.\d+)*)")
#: Where apt (Jetson, x86 distributions) and the CUDA toolkit put C version headers.
INCLUDE_DIRS = ("usr/include", "usr/include/aarch64-linux-gnu", "usr/include/x86_64-linux-gnu",
                "usr/local/cuda/include")


def l4t_release(path: str | Path = "/etc/nv_tegra_release") -> str | None:
    """The Jetson L4T release ("36.3.0" from "# R36 (release), REVISION: 3.0, ...") in
    ``/etc/nv_tegra_release``; None off Jetson or when unparsable.

    Part of the engine cache key (an engine built on one L4T release is not loadable on another)
    and of the report's environment.
    """
    m = _L4T_RE.search(read_text_or_none(Path(path)) or "")
    return f"{m.group(1)}.{m.group(2)}" if m else None


def header_version(root: Path, header: str, macros: Sequence[str]) -> str | None:
    """"8.9.4" from the ``#define`` lines of the first ``header`` found in :data:`INCLUDE_DIRS`
    under ``root``; a macro defined as another macro (as TensorRT 10 does: ``NV_TENSORRT_MAJOR
    TRT_MAJOR_ENTERPRISE``) is followed one step."""
    for folder in INCLUDE_DIRS:
        text = read_text_or_none(root / folder / header) or ""
        defines = dict(re.findall(r"^\s*#define\s+(\w+)\s+(\w+)", text, re.MULTILINE))
        values = [defines.get(defines.get(m, ""), defines.get(m)) for m in macros]
        if all(v is not None and v.isdigit() for v in values):
            return ".".join(values)  # type: ignore[arg-type]
    return None


def tensorrt_version(root: Path = Path("/")) -> str | None:
    """The installed TensorRT's version text, read without importing it (the report's probe:
    importing TensorRT loads its libraries): the Python package's metadata, else
    ``NvInferVersion.h`` (JetPack's apt install). None when neither is there."""
    try:
        return importlib.metadata.version("tensorrt")
    except (importlib.metadata.PackageNotFoundError, ValueError):
        return header_version(root, "NvInferVersion.h",
                              ("NV_TENSORRT_MAJOR", "NV_TENSORRT_MINOR", "NV_TENSORRT_PATCH"))
