"""Plain kernel bodies for tests/test_launch.py, wrapped there in ``JITFunction`` directly
(the test process decorates under TRITON_INTERPRET=1, which would make interpreter
functions; the launch layer's compiled path needs real ``JITFunction`` objects)."""

import triton.language as tl


def scale_rows(x_ptr, y_ptr, out_ptr, n, stride, scale, flag, BLOCK: tl.constexpr, EVEN: tl.constexpr = True):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(out_ptr + offs * stride, tl.load(x_ptr + offs) + tl.load(y_ptr + offs) * scale)


def positional_constexpr(x_ptr, n, BLOCK: tl.constexpr, m):
    offs = tl.arange(0, BLOCK)
    tl.store(x_ptr + offs, tl.load(x_ptr + offs) + n + m)
