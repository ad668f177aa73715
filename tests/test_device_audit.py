"""The device audits catch host syncs and host-built collective tensors on a CPU, and accept correct code."""

from __future__ import annotations

import sys
import threading
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch.overrides import _get_current_function_mode_stack

from tests.conftest import require_module
from tests.device_audit import CollectiveDeviceAudit, HostSyncCounter

HERE = "test_device_audit.py"
DEV = torch.device("cpu")  # stands for the collective device: on a GPU run this would be cuda:N


@pytest.fixture(scope="module", autouse=True)
def gloo() -> Iterator[None]:
    """A single-rank gloo world in this process (no spawning)."""
    created = not dist.is_initialized()
    if created:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    if created:
        dist.destroy_process_group()


class TwoRankView:
    """A one-rank group that reports size() 2, so megatron's mappings do not skip the collective."""

    def __init__(self, group: Any) -> None:
        self._group = group

    def size(self) -> int:
        return 2

    def __getattr__(self, name: str) -> Any:
        return getattr(self._group, name)


def assert_restored() -> None:
    assert _get_current_function_mode_stack() == []
    assert torch.autograd.has_torch_function is torch.overrides.has_torch_function
    assert type(dist.ProcessGroup.__dict__["allreduce"]).__name__ == "instancemethod"


# ---- HostSyncCounter -------------------------------------------------------------------------------------------


def _if(t: torch.Tensor) -> int:
    if t:
        return 1
    return 0


SYNCS: dict[str, Callable[[torch.Tensor], Any]] = {
    "item": lambda t: t.item(), "float": float, "bool": _if, "tolist": lambda t: t.tolist(), "cpu": lambda t: t.cpu(),
    "int": int, "index": lambda t: [0, 1, 2][t.long()], "format": lambda t: f"{t.reshape(()):.3f}",
    "repr": repr, "numpy": np.asarray, "to_cpu": lambda t: t.to("cpu"), "contains": lambda t: 1.0 in t,
    "equal": lambda t: torch.equal(t, t), "nonzero": lambda t: t.nonzero(),
}


@pytest.mark.parametrize("kind", sorted(SYNCS))
def test_counter_sees_each_sync_where_it_happens(kind: str) -> None:
    t = torch.ones(1)
    with HostSyncCounter() as counter:
        SYNCS[kind](t)
    assert counter.by_kind() == {kind: 1}, counter.report()
    assert all(HERE in where for _, where in counter.events), counter.events


def test_counter_sees_if_t_and_counts_each_site() -> None:
    t = torch.ones(1)
    with HostSyncCounter() as counter:
        for _ in range(3):
            _if(t)
        t.item()
    assert counter.by_kind() == {"bool": 3, "item": 1}
    (site, n), _ = counter.by_site().most_common()
    assert n == 3 and "_if" in site and HERE in site


def test_counter_counts_nothing_for_tensor_math() -> None:
    w = torch.nn.Parameter(torch.randn(4, 4))
    x = torch.randn(8, 4)
    with HostSyncCounter() as counter:
        y = torch.relu(x @ w).softmax(-1)
        loss = (y * torch.arange(4)).sum() + torch.zeros(1, device=DEV).sum()
        loss.backward()
        x.to(torch.float16)
    assert counter.count == 0, counter.report()
    assert w.grad is not None


def test_counter_sees_syncs_in_backward_hooks_and_function_backward() -> None:
    class Scale(torch.autograd.Function):
        @staticmethod
        def forward(ctx: Any, a: torch.Tensor) -> torch.Tensor:
            return a * 2

        @staticmethod
        def backward(ctx: Any, g: torch.Tensor) -> torch.Tensor:
            g.sum().item()
            return g * 2

    def read_norm(p: torch.Tensor) -> None:  # a grad-accumulation hook, as DeepSpeed's reducers use
        assert p.grad is not None
        p.grad.norm().tolist()

    w = torch.nn.Parameter(torch.ones(3))
    w.register_post_accumulate_grad_hook(read_norm)
    with HostSyncCounter() as counter:
        Scale.apply(w).sum().backward()
        torch.autograd.grad(Scale.apply(w).sum(), [w])
    assert counter.by_kind() == {"item": 2, "tolist": 1}, counter.report()


def test_counters_nest_and_restore_after_an_exception() -> None:
    t = torch.ones(1)
    with pytest.raises(RuntimeError, match="boom"), HostSyncCounter() as outer:
        t.item()
        with HostSyncCounter() as inner:
            float(t)
            torch.ones(1, requires_grad=True).sum().backward()
            raise RuntimeError("boom")
    assert outer.by_kind() == {"item": 1, "float": 1} and inner.by_kind() == {"float": 1}
    assert_restored()


# ---- CollectiveDeviceAudit ---------------------------------------------------------------------------------------


def test_audit_flags_host_built_tensors() -> None:
    param = torch.nn.Parameter(torch.ones(3))
    x = torch.ones(3)
    with CollectiveDeviceAudit() as audit:
        dist.all_reduce(torch.tensor([1.0]))
        dist.all_reduce(x.sum().cpu())
        a, a_line = torch.zeros(1), sys._getframe().f_lineno
        b = param.sum().reshape(1)
        dist.all_reduce(torch.stack([a, b]).sum().reshape(1))
        dist.all_reduce(torch.as_tensor(np.ones(2)))
    assert audit.calls == 4 and len(audit.violations) == 4
    for call in audit.violations:
        assert call.op == "all_reduce" and HERE in call.where and HERE in call.origins[0]
    assert audit.violations[2].origins[0].endswith(f"{HERE}:{a_line} (test_audit_flags_host_built_tensors)")
    with pytest.raises(AssertionError, match="host-built at"):
        audit.assert_clean()


def test_audit_accepts_device_tensors() -> None:
    param = torch.nn.Parameter(torch.ones(3))
    before = torch.ones(2)
    with CollectiveDeviceAudit() as audit:
        dist.all_reduce(torch.zeros(1, device=DEV))
        dist.all_reduce(param.sum().reshape(1))
        dist.all_reduce(torch.tensor([1.0]).to(DEV))
        dist.all_reduce(torch.tensor([1.0]).to(DEV, torch.float64))
        dist.all_reduce(before * 3)
        dist.all_reduce((param.sum() * torch.tensor(2.0)).reshape(1))  # a 0-dim host tensor is a scalar on CUDA
        dist.all_reduce(torch.zeros_like(torch.ones(2), device=DEV))
        with torch.device(DEV):
            dist.all_reduce(torch.zeros(2))
        buf = torch.empty(1, device=DEV)
        dist.all_reduce(buf.copy_(torch.tensor([5.0])))  # host -> device copy into a device buffer
    assert audit.calls == 9
    audit.assert_clean()


def test_audit_keeps_the_tag_of_what_stays_on_the_host() -> None:
    param = torch.nn.Parameter(torch.ones(2))
    with CollectiveDeviceAudit() as audit:
        host = torch.zeros(2)
        moved = host.to(DEV)  # on a CPU .to() would return `host` itself: the audit makes it copy
        dist.all_reduce(moved)
        dist.all_reduce(host.add_(param))  # in place: still the host tensor
        dist.all_reduce(torch.zeros_like(host))
        dist.all_reduce(host.new_zeros(3)[1:])
        dist.all_reduce(torch.as_tensor(host, device=DEV))
        dist.all_reduce(host.view(2, 1).t())
    assert moved is not host
    assert [c.host_built for c in audit.records] == [False, True, True, True, False, True]


def test_audit_follows_module_to_device() -> None:
    with CollectiveDeviceAudit() as audit:
        model = torch.nn.Linear(2, 2)
        dist.all_reduce(model.weight.data)
        model.to(DEV)
        dist.all_reduce(model.weight.data)
        model(torch.ones(1, 2, device=DEV)).sum().backward()
        dist.all_reduce(model.weight.grad)
    assert [c.host_built for c in audit.records] == [True, False, False]


def test_audit_sees_collectives_called_through_megatron_core() -> None:
    from megatron.core.tensor_parallel import mappings

    group = dist.new_group([0])
    tp = TwoRankView(group)
    with CollectiveDeviceAudit() as audit:
        mappings.reduce_from_tensor_model_parallel_region(torch.ones(4), group=group)
        assert audit.calls == 0  # megatron skips the collective on a one-rank group
        mappings.reduce_from_tensor_model_parallel_region(torch.ones(4), group=tp)
        mappings.reduce_from_tensor_model_parallel_region(torch.ones(4, device=DEV), group=tp)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            out = torch.empty(2, device=DEV)
            mappings.dist_all_gather_func(out, torch.ones(2), group=group)  # bound at import, not looked up
    assert [(c.op, c.host_built) for c in audit.records] == [
        ("all_reduce", True), ("all_reduce", False), ("all_gather_single", True)]
    assert "mappings.py" in audit.records[0].where and HERE in audit.records[0].where


def test_audit_sees_collectives_in_backward() -> None:
    from megatron.core.tensor_parallel import mappings

    tp = TwoRankView(dist.new_group([0]))
    x = torch.ones(3, requires_grad=True)
    with CollectiveDeviceAudit() as audit:
        y = mappings.copy_to_tensor_model_parallel_region(x, group=tp)
        y.register_hook(lambda g: dist.all_reduce(torch.zeros(1)) and None)
        (y * 2).sum().backward()
    assert [(c.op, c.host_built) for c in audit.records] == [("all_reduce", True), ("all_reduce", False)]


def test_audit_sees_deepspeed_comm() -> None:
    require_module("deepspeed")
    from deepspeed.comm.torch import TorchBackend

    backend = TorchBackend.__new__(TorchBackend)  # skip __init__: it builds DeepSpeed's shm extension
    backend.all_gather_function = TorchBackend.get_all_gather_function()  # bound once, as __init__ does
    with CollectiveDeviceAudit() as audit, warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        backend.all_reduce(torch.tensor([1.0]))
        backend.all_gather_into_tensor(torch.empty(1, device=DEV), torch.ones(1, device=DEV))
        backend.broadcast(torch.ones(1), src=0)
    assert [c.host_built for c in audit.records] == [True, False, True]
    assert "deepspeed/comm/torch.py" in audit.records[0].where


def test_audit_sees_other_threads_and_direct_process_group_calls() -> None:
    with CollectiveDeviceAudit() as audit:
        host = torch.tensor([1.0])
        worker = threading.Thread(target=dist.all_reduce, args=(host,))
        worker.start()
        worker.join()
        dist.distributed_c10d._get_default_group().allreduce([host]).wait()
    assert [(c.op, c.host_built) for c in audit.records] == [("ProcessGroup.allreduce", True)] * 2


def test_audit_restores_everything_after_an_exception() -> None:
    with pytest.raises(ValueError, match="boom"), CollectiveDeviceAudit() as audit, HostSyncCounter() as counter:
        dist.all_reduce(torch.zeros(1))
        torch.ones(1).item()
        raise ValueError("boom")
    assert audit.calls == 1 and counter.count == 1
    assert_restored()
    with CollectiveDeviceAudit() as outer, CollectiveDeviceAudit() as inner:
        dist.all_reduce(torch.zeros(1))
    assert outer.calls == inner.calls == 1
    assert_restored()
