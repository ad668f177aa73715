"""CPU-side checks for two bugs that only bite on NCCL GPUs: host syncs, and collectives fed host tensors.

On CI (CPU, gloo) a tensor built without ``device=`` works in a collective and ``.item()`` costs nothing; on GPUs
NCCL rejects the first and the second stalls the stream. Both context managers here are ``TorchFunctionMode`` s,
which see those bugs on a CPU. They nest, and restore everything on exit, also after an exception.

Dispatch (torch 2.13; tests/test_device_audit.py fails if a later torch stops): every sync below goes through
``__torch_function__``, even ``if t:``/``not t`` (``__bool__``), ``int``/``float``, list indexing and ``range(t)``
(``__index__``), f-strings (``__format__``), ``repr``/``str`` (``__repr__``) and ``np.asarray`` (``__array__``), and
so does every collective and p2p function of ``distributed_c10d``; so no Tensor method is patched. Two gaps are
closed by hand. (1) A mode runs the call it handles with itself popped, so ``Tensor.backward`` and
``torch.autograd.backward``/``grad`` would hide the backward pass (``Function.backward``, hooks: where Megatron and
DeepSpeed reduce gradients); the modes re-enter themselves for those, stubbing ``torch.autograd.has_torch_function``
meanwhile so the call does not come back to them. (2) The audit also wraps the ``ProcessGroup`` collective methods,
for calls from other threads or straight to ``group.allreduce``. Wrapping ``torch.distributed.<name>`` would miss
the references megatron-core (``mappings.dist_all_gather_func``) and DeepSpeed (``TorchBackend.all_gather_function``)
take at import; those still dispatch to the mode.

HostSyncCounter counts item, tolist, numpy/__array__, cpu, __bool__, __int__, __float__, __complex__, __index__,
__format__, __repr__, __contains__, equal, allclose, is_nonzero, nonzero/masked_select/unique (shapes from data),
``.to(...)`` with an explicit cpu target, and ``copy_`` from a device into a host tensor (GPU only). Not seen: syncs
inside a call already counted (a ``repr`` is one event), ``x[bool_mask]``, ``torch.cuda.synchronize``, C++, threads.

CollectiveDeviceAudit tags a storage *host-built*, with the site that built it, when it comes from a factory
(tensor, zeros, ones, empty, full, arange, rand*, eye, linspace, ...) without ``device=`` outside ``torch.device()``
contexts, from as_tensor/asarray of non-tensor data, from_numpy/frombuffer, ``.cpu()`` or ``.pin_memory()``. Tags sit
on storages (weakly): views, ``nn.Parameter(t)``, ``.data``, ``p.data = x`` follow them, in-place ops keep them.
Other ops tag their new outputs from a tagged input that is not 0-dim, or when all tensor inputs are tagged (CUDA
takes 0-dim host tensors as scalars; ``x[i]`` looks only at ``x``). ``device=``, ``.to(<device>)``, ``.cuda()`` give
untagged results, ``.to(other)`` the tag of ``other``; a move that would return its input itself (a no-op on a CPU)
returns a copy, as on a GPU. Tensors made before the audit (parameters, inputs) are untagged.
Limits: an explicit device is trusted whatever it is (``device='cpu'``, ``.to('cpu')``, ``set_default_device('cpu')``
look like ``device=dev`` on a CPU run); tensors made in other threads or in C++ are untagged; functional
collectives (``_functional_collectives``, DTensor) are not checked; callers may skip a collective on a one-rank
group (megatron's mappings do), so audit those with a group whose size() is above one.
"""

from __future__ import annotations

import inspect
import os
import sys
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed
from torch.overrides import TorchFunctionMode, _get_current_function_mode_stack
from torch.utils._device import DeviceContext
from torch.utils._pytree import tree_leaves
from torch.utils.weak import WeakIdKeyDictionary

T = torch.Tensor
_SKIP = (os.path.dirname(torch.__file__) + os.sep, os.path.abspath(__file__))
_AUTOGRAD = (T.backward, torch.autograd.backward, torch.autograd.grad)
_BACKWARD = inspect.signature(T.backward)
_SYNCS: dict[Any, str] = {
    T.item: "item", T.tolist: "tolist", T.numpy: "numpy", T.__array__: "numpy", T.cpu: "cpu", T.__bool__: "bool",
    T.__int__: "int", T.__float__: "float", T.__complex__: "complex", T.__index__: "index", T.__format__: "format",
    T.__repr__: "repr", T.__contains__: "contains", torch.equal: "equal", torch.allclose: "allclose",
    torch.is_nonzero: "is_nonzero", T.nonzero: "nonzero", torch.nonzero: "nonzero", T.masked_select: "masked_select",
    torch.masked_select: "masked_select", T.unique: "unique", torch.unique: "unique"}
_FACTORIES = {torch.tensor, torch.as_tensor, torch.asarray, torch.zeros, torch.ones, torch.empty, torch.full,
              torch.arange, torch.linspace, torch.logspace, torch.eye, torch.rand, torch.randn, torch.randint,
              torch.randperm, torch.empty_strided, torch.scalar_tensor, torch.tril_indices, torch.triu_indices}
_HOST = {torch.from_numpy, torch.frombuffer, T.cpu, T.pin_memory}
_MOVES = {T.to, T.cuda, T.cpu, T.pin_memory}
_PG_METHODS = ("allreduce", "allreduce_coalesced", "allgather", "_allgather_base", "all_gather_single",
               "allgather_coalesced", "allgather_into_tensor_coalesced", "reduce_scatter", "_reduce_scatter_base",
               "reduce_scatter_single", "reduce_scatter_tensor_coalesced", "broadcast", "reduce", "alltoall",
               "alltoall_base", "all_to_all_single", "gather", "scatter", "send", "recv")


def call_site(depth: int = 3) -> str:
    """``file:line (function)`` of the innermost ``depth`` frames outside torch/ and this module, then, if those are
    all in site-packages (megatron-core, DeepSpeed), ``...`` and the first frame outside it; joined by ' <- '."""
    found: list[str] = []
    frame = sys._getframe(1)
    while frame is not None:
        path = frame.f_code.co_filename
        if not path.startswith(_SKIP[0]) and os.path.abspath(path) != _SKIP[1]:
            short = path.split(os.getcwd() + os.sep, 1)[-1].split("site-packages" + os.sep, 1)[-1]
            here = f"{short}:{frame.f_lineno} ({frame.f_code.co_name})"
            if "site-packages" not in path:
                return " <- ".join(found[:depth] + ["..."] * (len(found) > depth) + [here])
            found.append(here)
        frame = frame.f_back
    return " <- ".join(found[:depth]) or "<unknown>"


def _key(t: torch.Tensor) -> Any:
    """What a tag hangs on: the storage, so views, nn.Parameter(t), .data and p.data = x carry it."""
    try:
        return t.untyped_storage()
    except (RuntimeError, NotImplementedError, TypeError):  # sparse, wrapper subclasses
        return t


def _device_arg(a: Any) -> bool:
    return isinstance(a, (str, torch.device)) or type(a) is int


class _Mode(TorchFunctionMode):
    """A mode that stays active through backward passes it starts (see the module docstring)."""

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func in _AUTOGRAD:
            return self._autograd(func, args, kwargs)
        return self._handle(func, args, kwargs)

    def _autograd(self, func: Any, args: tuple, kwargs: dict) -> Any:
        if func is T.backward:  # what Tensor.backward's body does
            (b := _BACKWARD.bind(*args, **kwargs)).apply_defaults()
            g = b.arguments
            func, args, kwargs = torch.autograd.backward, (g["self"], g["gradient"], g["retain_graph"],
                                                           g["create_graph"]), {"inputs": g["inputs"]}
        saved = torch.autograd.has_torch_function
        torch.autograd.has_torch_function = lambda *_: False
        TorchFunctionMode.__enter__(self)
        try:
            return func(*args, **kwargs)
        finally:
            TorchFunctionMode.__exit__(self, None, None, None)
            torch.autograd.has_torch_function = saved


class HostSyncCounter(_Mode):
    """Counts host syncs while active. ``events``: list of (kind, where); ``count``; ``by_site()``/``by_kind()``."""

    def __init__(self) -> None:
        super().__init__()
        self.events: list[tuple[str, str]] = []

    def _handle(self, func: Any, args: tuple, kwargs: dict) -> Any:
        kind = _SYNCS.get(func)
        if func is T.to:
            dev = kwargs.get("device", next((a for a in args[1:] if _device_arg(a) or isinstance(a, T)), None))
            dev = dev.device if isinstance(dev, T) else dev
            kind = "to_cpu" if dev is not None and type(dev) is not int and torch.device(dev).type == "cpu" else None
        elif func is T.copy_ and isinstance(args[1], T) and args[0].device.type == "cpu" != args[1].device.type:
            kind = "copy_to_host"
        if kind:
            self.events.append((kind, call_site(1)))
        return func(*args, **kwargs)

    @property
    def count(self) -> int:
        return len(self.events)

    def by_site(self) -> Counter[str]:
        return Counter(where for _, where in self.events)

    def by_kind(self) -> Counter[str]:
        return Counter(kind for kind, _ in self.events)

    def report(self) -> str:
        sites = Counter(self.events).most_common()
        return f"{self.count} host syncs:\n" + "\n".join(f"  {n}x {k} at {w}" for (k, w), n in sites)


@dataclass(frozen=True)
class CollectiveCall:
    """One collective call: ``op`` (the c10d function, or ``ProcessGroup.<method>``), its call site ``where``, and
    per tensor argument the site it was host-built at, or None."""

    op: str
    where: str
    origins: tuple[str | None, ...]

    @property
    def host_built(self) -> bool:
        return any(o is not None for o in self.origins)

    def __str__(self) -> str:
        bad = "; ".join(f"tensor {i} host-built at {o}" for i, o in enumerate(self.origins) if o is not None)
        return f"{self.op} at {self.where}: {bad or 'ok'}"


class CollectiveDeviceAudit(_Mode):
    """Checks that every tensor given to a torch.distributed collective was built for the collective device.

    ``records``: every CollectiveCall seen; ``calls``: how many; ``violations``: those given a host-built tensor;
    ``assert_clean()`` raises listing them; ``origin(t)``: where the data of ``t`` was host-built, or None.
    """

    def __init__(self) -> None:
        super().__init__()
        self.tags: WeakIdKeyDictionary = WeakIdKeyDictionary()
        self.records: list[CollectiveCall] = []
        self._busy = threading.local()
        self._saved: dict[str, Any] = {}

    @property
    def calls(self) -> int:
        return len(self.records)

    @property
    def violations(self) -> list[CollectiveCall]:
        return [r for r in self.records if r.host_built]

    def assert_clean(self) -> None:
        if self.violations:
            raise AssertionError("collectives given host-built tensors:\n" + "\n".join(map(str, self.violations)))

    def __enter__(self) -> CollectiveDeviceAudit:
        pg = torch.distributed.ProcessGroup
        for name in _PG_METHODS:
            if name in pg.__dict__:
                self._saved[name] = pg.__dict__[name]
                setattr(pg, name, self._pg_hook(name, pg.__dict__[name]))
        return super().__enter__()  # cannot fail: it pushes the mode

    def __exit__(self, *exc: Any) -> None:
        try:
            super().__exit__(*exc)
        finally:
            for name, original in self._saved.items():
                setattr(torch.distributed.ProcessGroup, name, original)
            self._saved = {}

    def _pg_hook(self, name: str, original: Any) -> Callable[..., Any]:
        def hook(pg: Any, *args: Any, **kwargs: Any) -> Any:
            if not getattr(self._busy, "depth", 0):  # not already recorded by the mode
                self._record(f"ProcessGroup.{name}", args, kwargs)
            return original(pg, *args, **kwargs)
        return hook

    def _record(self, op: str, args: tuple, kwargs: dict) -> None:
        tensors = [t for t in tree_leaves((args, kwargs)) if isinstance(t, T)]
        self.records.append(CollectiveCall(op, call_site(), tuple(self.origin(t) for t in tensors)))

    def origin(self, t: torch.Tensor) -> str | None:
        return self.tags.get(_key(t))

    def _handle(self, func: Any, args: tuple, kwargs: dict) -> Any:
        if getattr(func, "__module__", None) == "torch.distributed.distributed_c10d":
            self._record(func.__name__, args, kwargs)
            self._busy.depth = getattr(self._busy, "depth", 0) + 1
            try:
                return func(*args, **kwargs)
            finally:
                self._busy.depth -= 1
        tag = self._tag_for(func, args, kwargs)
        out = func(*args, **kwargs)
        inputs = {id(_key(t)) for t in tree_leaves((args, kwargs)) if isinstance(t, T)}
        moves = func in _MOVES or kwargs.get("device") is not None
        if moves and isinstance(out, T) and id(_key(out)) in inputs and self.origin(out) != tag:
            out = out.clone()  # a copy, as on a GPU: on a CPU the move hands back (an alias of) its input
        if tag is not None:
            for t in tree_leaves(out):
                if isinstance(t, T) and id(_key(t)) not in inputs:  # not in-place results, not views of inputs
                    self.tags[_key(t)] = tag
        return out

    def _tag_for(self, func: Any, args: tuple, kwargs: dict) -> str | None:
        """The host-built site the new outputs of ``func(*args, **kwargs)`` get, or None."""
        if func in _HOST:
            return call_site()
        if kwargs.get("device") is not None or func is T.cuda:
            return None
        if func in _FACTORIES and not (args and isinstance(args[0], T)):
            explicit = any(isinstance(m, DeviceContext) for m in _get_current_function_mode_stack())
            return None if explicit else call_site()
        if func is T.to:
            for a in args[1:]:
                if isinstance(a, T):
                    return self.origin(a)
                if _device_arg(a):
                    return None
        tensors = [args[0]] if func is T.__getitem__ else [t for t in tree_leaves((args, kwargs)) if isinstance(t, T)]
        tagged = [t for t in tensors if self.origin(t) is not None]
        big = [t for t in tagged if t.dim() > 0]
        if big or (tagged and len(tagged) == len(tensors)):
            return self.origin((big or tagged)[0])
        return None
