"""Exported programs: a network traced by ``torch.export`` (``.pt2``) or to ONNX, and written to a file."""
from __future__ import annotations

import errno
import io
import json
import os
from pathlib import Path

import torch
import torch.nn as nn

from .errors import UserError
from .faults import faults


def trace_program(net: nn.Module, example: torch.Tensor, fmt: str):
    """The network as a ``torch.export`` program (pt2) or an ONNX program, batch size dynamic."""
    batch = torch.export.Dim("batch", min=1, max=1 << 16)
    if fmt == "pt2":
        return torch.export.export(net, (example,), dynamic_shapes=({0: batch},))
    try:
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError:
        raise UserError('format=onnx needs the onnx and onnxscript packages: pip install "tdlrt[export]"') from None
    return torch.onnx.export(net, (example,), dynamo=True, dynamic_shapes=({0: batch},), verbose=False)


def write_program(program, out: Path, fmt: str, metadata: dict) -> None:
    """``.pt2``: the archive is built in memory and written with Python's file I/O, so a failed write (a full
    disk) is an OSError; torch's zip writer, given the file, aborts the process instead (``terminate called
    ... c10::Error``, when its destructor retries the write)."""
    if fmt == "pt2":
        buffer = io.BytesIO()
        torch.export.save(program, buffer, extra_files={"tdlrt.json": json.dumps(metadata)})
        with open(out, "wb") as fh:
            if faults.disk_full_in_export:  # fault injection: the disk fills half-way through the file
                fh.write(buffer.getbuffer()[: buffer.tell() // 2])
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            fh.write(buffer.getbuffer())
    else:
        program.save(str(out))


def save_program(net: nn.Module, example: torch.Tensor, out: Path, fmt: str, metadata: dict) -> None:
    write_program(trace_program(net, example, fmt), out, fmt, metadata)
