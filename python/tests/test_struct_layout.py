"""The ctypes structs have the C header's sizes and offsets, field for field, and the header's
constants. A tiny C program compiled against include/nccl_moe.h prints them."""
import ctypes
import json
import os
import shutil
import subprocess

import pytest

from conftest import header_include_dirs
from nccl_moe import _structs

STRUCTS = {
    "ncclMoeConfig_t": _structs.ConfigStruct,
    "ncclMoeDispatchOutput_t": _structs.DispatchOutputStruct,
    "ncclMoeLowLatencyOutput_t": _structs.LowLatencyOutputStruct,
}
CONSTANTS = {
    "NCCL_MOE_VERSION_CODE": _structs.HEADER_VERSION,
    "NCCL_MOE_CONFIG_MAGIC": _structs.CONFIG_MAGIC,
    "NCCL_MOE_DISPATCH_HOST_COUNTS": _structs.DISPATCH_HOST_COUNTS,
    "NCCL_MOE_LL_SEND_ONLY": _structs.LL_SEND_ONLY,
    "ncclMoeLowLatency": _structs.MODE_LOW_LATENCY,
    "ncclMoeFp8E4m3": _structs.DTYPE_FP8_E4M3,
    "ncclMoeScaleFp32Pow2": _structs.SCALE_FP32_POW2,
    "ncclMoeScaleUe8m0": _structs.SCALE_UE8M0,
    "ncclInvalidArgument": 4,
    "ncclInvalidUsage": 5,
}


def _c_program():
    lines = ["#include <stdio.h>", "#include <stddef.h>", "#include <nccl_moe.h>",
             "int main(void) {", 'printf("{");']
    for cname, cls in STRUCTS.items():
        lines.append(f'printf("\\"{cname}\\": {{\\"sizeof\\": %zu", sizeof({cname}));')
        for field, _ in cls._fields_:
            lines.append(f'printf(", \\"{field}\\": %zu", offsetof({cname}, {field}));')
        lines.append('printf("}, ");')
    for name in CONSTANTS:
        lines.append(f'printf("\\"{name}\\": %lld, ", (long long){name});')
    lines += ['printf("\\"end\\": 0}\\n");', "return 0; }"]
    return "\n".join(lines)


@pytest.fixture(scope="module")
def c_layout(tmp_path_factory):
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler")
    incs = header_include_dirs()
    for path, header in zip(incs[1:], ("nccl.h", "cuda_runtime.h")):
        if not os.path.exists(os.path.join(path, header)):
            pytest.skip(f"{header} not under {path} (set NCCL_HOME / CUDA_HOME)")
    d = tmp_path_factory.mktemp("layout")
    (d / "layout.c").write_text(_c_program())
    cmd = [cc, "-std=c11", *[f"-I{i}" for i in incs], str(d / "layout.c"), "-o", str(d / "layout")]
    subprocess.run(cmd, check=True, capture_output=True)
    return json.loads(subprocess.run([str(d / "layout")], check=True, capture_output=True,
                                     text=True).stdout)


@pytest.mark.parametrize("cname", sorted(STRUCTS))
def test_struct_matches_header(c_layout, cname):
    """Equal offsets of the mirrored fields and an equal size: a C field added anywhere shows
    up as a shifted offset or a different size."""
    cls = STRUCTS[cname]
    expected = c_layout[cname]
    assert ctypes.sizeof(cls) == expected["sizeof"], cname
    for field, _ in cls._fields_:
        assert getattr(cls, field).offset == expected[field], f"{cname}.{field}"


@pytest.mark.parametrize("name", sorted(CONSTANTS))
def test_constant_matches_header(c_layout, name):
    assert CONSTANTS[name] == c_layout[name], name
