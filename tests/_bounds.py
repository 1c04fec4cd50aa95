"""Test-time bounds checker for Triton kernels run by the interpreter (TRITON_INTERPRET=1).

The interpreter does no bounds checks: an out-of-bounds load silently returns whatever lies in host
memory (tests/README.md), and an out-of-bounds store corrupts it. This checker sees every load and
store of every launch and checks each address whose mask is true against the tensors passed to that
launch: an access must fall wholly inside one of them (from the lowest to the highest element its
sizes and strides reach: a view's own extent, not the rest of its storage). A masked-off lane is not
an access (the GPU does not touch it either), so a masked load past the end is fine, an unmasked one
is an error naming the kernel, the nearest tensor argument below the address and the offset in
elements from its first element. The out-of-bounds lanes are then switched off (a load gives its
`other`, a store writes nothing), so a caught overrun does not also corrupt the test process.

How it hooks the interpreter (triton 3.6 to 3.9 have these, with different trailing parameters,
passed through untouched): `GridExecutor._init_args_hst` (the launch's host copies of its tensor
arguments: their addresses are what the kernel's pointers hold), `GridExecutor.__call__` (one
launch: the kernel's name), and `InterpreterBuilder.create_masked_load` / `create_masked_store`
(every tl.load / tl.store; the unmasked forms call these with an all-true mask) and
`create_atomic_rmw` / `create_atomic_cas`.

    with BoundsChecker() as bc:
        run_kernels()
    assert bc.errors == [] and bc.launches > 0

The `bounds_check` fixture does that around a test (tests/conftest.py makes it available);
tests/test_bounds.py proves it catches an out-of-bounds access and runs the ragged-shape cases of
every kernel family under it.
"""
from __future__ import annotations

import functools

import numpy as np


class BoundsChecker:
    """Context manager: while active, every interpreted launch's accesses are checked (see module doc)."""

    _active = None  # one checker at a time: the hooks read it

    def __init__(self):
        self.errors: list[str] = []  # one line per out-of-bounds access (first lane of each load/store)
        self.launches = 0  # launches seen
        self.accesses = 0  # load/store lanes checked (mask true)
        self._launch = None  # (kernel name, [(arg name, start, end, element size)]) of the running launch

    # -- installation -------------------------------------------------------------------------
    def __enter__(self):
        _install()
        assert BoundsChecker._active is None, "bounds checkers do not nest"
        BoundsChecker._active = self
        return self

    def __exit__(self, *exc):
        BoundsChecker._active = None
        return False

    # -- what the hooks call ------------------------------------------------------------------
    def _set_args(self, name, arg_names, args_hst, kwargs_hst):
        extents = []
        named = list(zip(arg_names, args_hst)) + list(kwargs_hst.items())
        for arg_name, t in named:
            for i, x in enumerate(t if isinstance(t, tuple) else (t,)):
                if hasattr(x, "data_ptr") and hasattr(x, "stride") and x.numel() > 0:
                    el = x.element_size()
                    lo = sum((n - 1) * s for n, s in zip(x.shape, x.stride()) if s < 0)
                    hi = sum((n - 1) * s for n, s in zip(x.shape, x.stride()) if s > 0)
                    label = arg_name if not isinstance(t, tuple) else f"{arg_name}[{i}]"
                    extents.append((label, x.data_ptr() + lo * el, x.data_ptr() + (hi + 1) * el, el))
        self._launch = (name, extents)
        self.launches += 1

    def _check(self, kind, ptrs, mask):
        """Record the out-of-bounds lanes of one access; returns the mask with them switched off (so
        a caught overrun does not also corrupt the test process's memory), or None when all are in."""
        if self._launch is None:
            return None
        shape = np.shape(ptrs.data)
        addr = np.asarray(ptrs.data).astype(np.uint64, copy=False).reshape(-1)
        m = np.ones(addr.shape, dtype=bool) if mask is None else \
            np.broadcast_to(np.asarray(mask.data, dtype=bool), shape).reshape(-1)
        if not m.any():
            return None
        self.accesses += int(m.sum())
        size = np.uint64(max(ptrs.get_element_ty().primitive_bitwidth // 8, 1))
        name, extents = self._launch
        ok = ~m
        for _, start, end, _ in extents:
            ok |= (addr >= np.uint64(start)) & (addr + size <= np.uint64(end))
        if ok.all():
            return None
        bad = int(addr[~ok][0])
        below = [e for e in extents if e[1] <= bad]
        if below:
            arg, start, end, el = max(below, key=lambda e: e[1])
            where = (f"argument {arg}, element offset {(bad - start) // el} (byte {bad - start}; "
                     f"its extent is {(end - start) // el} elements)")
        else:
            where = "below every tensor argument"
        self.errors.append(f"{name}: {kind} out of bounds ({int((~ok).sum())} lanes), {where}")
        return (m & ok).reshape(shape)


_INSTALLED = False


def _install():
    """Wrap the interpreter's hooks once per process (they do nothing while no checker is active)."""
    global _INSTALLED
    if _INSTALLED:
        return
    from triton.runtime import interpreter

    grid_executor, builder = interpreter.GridExecutor, interpreter.InterpreterBuilder
    needed = [(grid_executor, "_init_args_hst"), (grid_executor, "__call__"), (builder, "create_masked_load"),
              (builder, "create_masked_store")]
    missing = [f"{c.__name__}.{m}" for c, m in needed if not hasattr(c, m)]
    if missing:
        raise RuntimeError(f"tests/_bounds.py: this triton's interpreter lacks {missing}; update the hooks")

    init_args, call = grid_executor._init_args_hst, grid_executor.__call__
    masked_load, masked_store = builder.create_masked_load, builder.create_masked_store

    # functools.wraps: the wrappers keep the originals' signatures (tools/traffic.py reads them to
    # check the hooks' argument order, and may wrap these in turn)
    @functools.wraps(init_args)
    def _init_args_hst(self, args_dev, kwargs):
        args_hst, kwargs_hst = init_args(self, args_dev, kwargs)
        bc = BoundsChecker._active
        if bc is not None:
            bc._set_args(getattr(self.fn, "__name__", "?"), self.arg_names, args_hst, kwargs_hst)
        return args_hst, kwargs_hst

    @functools.wraps(call)
    def __call__(self, *args, **kwargs):
        try:
            return call(self, *args, **kwargs)
        finally:
            if BoundsChecker._active is not None:
                BoundsChecker._active._launch = None

    def checked_mask(kind, ptrs, mask):
        bc = BoundsChecker._active
        safe = bc._check(kind, ptrs, mask) if bc is not None else None
        return mask if safe is None else interpreter.TensorHandle(safe, mask.dtype)

    @functools.wraps(masked_load)
    def create_masked_load(self, ptrs, mask, *rest, **kw):
        return masked_load(self, ptrs, checked_mask("load", ptrs, mask), *rest, **kw)

    @functools.wraps(masked_store)
    def create_masked_store(self, ptrs, value, mask, *rest, **kw):
        return masked_store(self, ptrs, value, checked_mask("store", ptrs, mask), *rest, **kw)

    grid_executor._init_args_hst, grid_executor.__call__ = _init_args_hst, __call__
    builder.create_masked_load, builder.create_masked_store = create_masked_load, create_masked_store

    if hasattr(builder, "create_atomic_rmw"):
        rmw = builder.create_atomic_rmw

        @functools.wraps(rmw)
        def create_atomic_rmw(self, op, ptr, val, mask, *rest, **kw):
            return rmw(self, op, ptr, val, checked_mask("atomic", ptr, mask), *rest, **kw)

        builder.create_atomic_rmw = create_atomic_rmw
    if hasattr(builder, "create_atomic_cas"):
        cas = builder.create_atomic_cas

        @functools.wraps(cas)
        def create_atomic_cas(self, ptr, *rest, **kw):  # no mask to narrow: reported, then run as asked
            if BoundsChecker._active is not None:
                BoundsChecker._active._check("atomic", ptr, None)
            return cas(self, ptr, *rest, **kw)

        builder.create_atomic_cas = create_atomic_cas
    _INSTALLED = True


def bounds_check_fixture():
    """Generator body of the `bounds_check` fixture: yields the checker, then asserts that the test
    launched at least one kernel and that none of its accesses was out of bounds."""
    with BoundsChecker() as bc:
        yield bc
    assert bc.launches > 0, "bounds_check: the test launched no Triton kernel (is the triton backend in use?)"
    assert not bc.errors, f"{len(bc.errors)} out-of-bounds accesses:\n" + "\n".join(bc.errors[:20])
