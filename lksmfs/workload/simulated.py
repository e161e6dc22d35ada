"""A MemorySource generated from a workload file: deterministic processes for tests and benches.

Every instance of the workload (APP/K) becomes a task with a synthetic pid and start time,
an address space laid out like a real process (randomised bases per instance, as ASLR
does) and pages whose contents come from lksmfs.workload.model, the same content function
the real spawned children use.  Layout of one instance, in address order:

    app binary: r--p, r-xp, r--p file mappings (no anonymous pages)
    [heap]
    extra anon mappings (the seed's DLL look-back finds the binary before the heap, so
        LKSM_FILTER files them as file_bss of the binary)
    per library (placed top-down from a random mmap base):
        r-xp text, r--p rodata (file, no anon), rw-p .data (file, every page COWed: anon),
        anonymous rw-p .bss right after .data
    [stack]

Every workload page is present and anonymous (zero pages are written with zeros, so they
are anonymous too); nothing else is.  The timeline is driven with `advance_round(n)` or
`apply(event)` (lksmfs.workload.timeline, shared with the real spawner), which return
what the daemon must tell the engine (freeze/thaw hints, one-shot requests).
`expected_sharing()` is an independent oracle: what a KSM with unlimited
max_page_sharing and no filter would reach on the current contents.
"""

from __future__ import annotations

import random
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

from lksmfs.engine.params import KSM_SHORT_TASK_TIME_MS
from lksmfs.sources.base import PAGE_SHIFT, Mapping, ProcessGone, TaskId, TaskStat
from lksmfs.workload.model import KINDS, PAGE_TABLE, WORDS, InstanceModel, aslr_seed
from lksmfs.workload.schema import KSM_PRCTL, Workload, load_workload
from lksmfs.workload.timeline import Change, Effects, NewRound, Rewrite, TimelinePlayer

SIM_DEV = (8 << 8) | 1  # every simulated file lives on "sda1"
FIRST_PID = 1000
_TABLE = np.array(PAGE_TABLE, dtype=np.uint64)


@dataclass(frozen=True)
class Sharing:
    pages_shared: int = 0
    pages_sharing: int = 0


@dataclass(frozen=True)
class ExpectedSharing:
    """The oracle's answer.  `by_kind` counts non-zero contents per section kind (they never
    coincide across kinds); zero-filled pages are a group of their own (`zero`), or
    ksm_zero_pages when use_zero_pages is set.  The totals are the sums."""

    pages_shared: int
    pages_sharing: int
    ksm_zero_pages: int
    pages_total: int
    zero_pages: int
    zero: Sharing
    by_kind: dict[str, Sharing]


@dataclass
class SimInstance:
    """One simulated process."""

    name: str
    app: str
    task: TaskId
    model: InstanceModel
    mappings: list[Mapping]
    section_start: dict[str, int]  # sid -> first vpn
    vpns: np.ndarray  # every present anon vpn, sorted
    keys: np.ndarray  # the content key of each, aligned with vpns
    section_slice: dict[str, tuple[int, int]]  # sid -> (lo, hi) into vpns/keys
    runtime_ns: int
    frozen: bool = False
    alive: bool = True
    pending: list[Rewrite] = field(default_factory=list)
    version: int = 0  # bumped whenever a page's content changes (content_version)

    def refresh(self, changed: dict[str, list[int]]) -> None:
        if any(changed.values()):
            self.version += 1
        for sid, offs in changed.items():
            lo, _ = self.section_slice[sid]
            sec = self.model.sections[sid]
            for off in offs:
                self.keys[lo + off] = self.model.key(sec, off)

    def play(self, change: Change) -> None:
        """The model's pages after `change`, and the key of each page that changed."""
        if isinstance(change, NewRound):
            self.refresh(self.model.set_round(change.round))
        else:
            self.refresh(self.model.rewrite(change.fraction, change.number))


class SimulatedSource(TimelinePlayer[SimInstance]):
    """MemorySource over a workload; thread-safe (one lock for state, per-thread page buffers)."""

    def __init__(self, workload: Workload) -> None:
        super().__init__(workload)
        self._next_pid = FIRST_PID
        self._local = threading.local()
        self._by_task: dict[TaskId, SimInstance] = {}
        names = sorted({lib.name for lib in workload.libraries})
        self._lib_ino = {n: 200001 + i for i, n in enumerate(names)}
        self._bin_ino = {a.name: 300001 + i for i, a in enumerate(workload.apps)}
        self._spawn_initial()

    @classmethod
    def from_file(cls, path: str) -> SimulatedSource:
        """Load and validate a workload YAML file (raises WorkloadError)."""
        return cls(load_workload(path))

    # -- MemorySource -------------------------------------------------------------------

    def tasks(self) -> list[TaskId]:
        with self._lock:
            return [i.task for i in self._instances.values() if i.alive]

    def stat(self, task: TaskId) -> TaskStat:
        inst = self._get(task)
        return TaskStat(
            comm=inst.app[:15],
            runtime_ns=inst.runtime_ns,
            faults=inst.model.writes,
            anon_pages=int(len(inst.vpns)),
        )

    def mappings(self, task: TaskId) -> list[Mapping]:
        return list(self._get(task).mappings)

    def page_nodes(self, task: TaskId, vpns: np.ndarray) -> np.ndarray:
        """The NUMA node of each page: its instance's (`numa_nodes`; lksmfs.engine.numa)."""
        inst = self._get(task)
        return np.full(vpns.shape[0], inst.model.app.node_of(inst.model.index), dtype=np.int32)

    def ksm_opt_in(self, task: TaskId) -> tuple[bool, bool]:
        """(ksm_merge_any, ksm_mergeable) as the app's `ksm:` opt-in makes them
        (lksmfs.engine.ksmd.KsmOptIn)."""
        inst = self._get(task)
        return inst.model.app.ksm == KSM_PRCTL, any(m.vm_mergeable for m in inst.mappings)

    def present_anon(self, task: TaskId, start_vpn: int, end_vpn: int) -> np.ndarray:
        inst = self._get(task)
        lo, hi = np.searchsorted(inst.vpns, [start_vpn, end_vpn])
        return inst.vpns[lo:hi].copy()

    def read_pages(self, task: TaskId, vpns: np.ndarray, out: memoryview | None = None) -> memoryview:
        return self.contents(self.page_keys(task, vpns), out)

    def thp_blocks(self, task: TaskId, start_vpn: int, end_vpn: int) -> np.ndarray:
        return np.zeros(0, dtype=np.int64)  # a simulated page is a 4 KiB page

    # -- content keys (what lksmfs.engine.fastpass needs to skip reading pages) ------------

    def page_keys(self, task: TaskId, vpns: np.ndarray) -> np.ndarray:
        """The content key of each page (equal keys: equal bytes; lksmfs.workload.model)."""
        inst = self._get(task)
        vpns = np.asarray(vpns, dtype=np.uint64)
        n = len(vpns)
        with self._lock:
            idx = np.searchsorted(inst.vpns, vpns)
            idx = np.minimum(idx, max(len(inst.vpns) - 1, 0))
            if n and (len(inst.vpns) == 0 or not np.array_equal(inst.vpns[idx], vpns)):
                raise ValueError(f"{inst.name}: read of a page that is not present anon")
            return inst.keys[idx]

    def contents(self, keys: np.ndarray, out: memoryview | None = None) -> memoryview:
        """The bytes of pages with these content keys, concatenated: into `out` when
        given, else a reused buffer."""
        n = len(keys)
        if out is None:
            buf = self._buffer(n)
        else:
            buf = np.frombuffer(out, dtype=np.uint64, count=n * WORDS).reshape(n, WORDS)
        np.bitwise_xor(keys[:, None], _TABLE[None, :], out=buf)
        buf[keys == 0] = 0
        return memoryview(buf.reshape(-1).view(np.uint8).data)

    def content_version(self, task: TaskId) -> int:
        """Changes whenever a page of the task changes content (same value: same pages)."""
        return self._get(task).version

    def layout_version(self, task: TaskId) -> int:
        """Changes whenever the task's mappings or present pages change: never, here (an
        instance keeps its layout from spawn to exit)."""
        self._get(task)
        return 0

    def cpu_mark(self, task: TaskId) -> None:
        """Pages are computed, never read: nothing to save by knowing."""
        return None

    def release(self, task: TaskId) -> None:
        """Nothing is held per task."""

    def close(self) -> None:
        """Nothing to release."""

    # -- inspection -----------------------------------------------------------------------

    def instances(self, app: str | None = None, alive: bool = True) -> list[str]:
        """Instance names (APP/K) in spawn order."""
        with self._lock:
            return [n for n, i in self._instances.items()
                    if (app is None or i.app == app) and (i.alive or not alive)]

    def instance(self, name: str) -> SimInstance:
        return self._instances[name]

    def task_of(self, name: str) -> TaskId:
        return self._instances[name].task

    def instance_of(self, task: TaskId) -> str:
        return self._by_task[task].name

    def section_vpn(self, name: str, sid: str) -> int:
        """First vpn of section `sid` ('lib:NAME:data', 'heap', ...) in instance `name`."""
        return self._instances[name].section_start[sid]

    def lib_identity(self, lib: str) -> tuple[int, int]:
        """(dev, inode) of a simulated library file."""
        return (SIM_DEV, self._lib_ino[lib])

    # -- timeline hooks (the player is lksmfs.workload.timeline) ---------------------------

    def _start(self, names: Sequence[tuple[str, int]]) -> list[SimInstance]:
        return [self._new_instance(app, index) for app, index in names]

    def _update(self, updates: Sequence[tuple[SimInstance, Sequence[Change]]]) -> None:
        for inst, changes in updates:
            for change in changes:
                inst.play(change)

    # -- the oracle -------------------------------------------------------------------------

    def expected_sharing(
        self,
        *,
        use_zero_pages: bool = False,
        instances: Iterable[str] | None = None,
        skip_short: bool = False,
        kinds: Iterable[str] = KINDS,
    ) -> ExpectedSharing:
        """pages_shared/pages_sharing a KSM with unlimited max_page_sharing and no filter
        would converge to over the current contents of the chosen live instances (default:
        all; skip_short drops instances under 100 ms of CPU, as LKSM does)."""
        with self._lock:
            chosen = [self._instances[n] for n in (instances if instances is not None
                                                   else self.instances())]
            kinds = tuple(kinds)
            per_kind: dict[str, list[np.ndarray]] = {k: [] for k in kinds}
            for inst in chosen:
                if not inst.alive or (skip_short and inst.runtime_ns < KSM_SHORT_TASK_TIME_MS * 10**6):
                    continue
                for sid, (lo, hi) in inst.section_slice.items():
                    kind = inst.model.sections[sid].kind
                    if kind in per_kind:
                        per_kind[kind].append(inst.keys[lo:hi])
        by_kind: dict[str, Sharing] = {}
        zeros = total = 0
        for kind, parts in per_kind.items():
            keys = np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint64)
            total += len(keys)
            nz = keys[keys != 0]
            zeros += len(keys) - len(nz)
            _, counts = np.unique(nz, return_counts=True)
            dup = counts[counts >= 2]
            by_kind[kind] = Sharing(int(len(dup)), int((dup - 1).sum()))
        if use_zero_pages:
            zero = Sharing()
        else:
            zero = Sharing(1, zeros - 1) if zeros >= 2 else Sharing()
        return ExpectedSharing(
            pages_shared=sum(s.pages_shared for s in by_kind.values()) + zero.pages_shared,
            pages_sharing=sum(s.pages_sharing for s in by_kind.values()) + zero.pages_sharing,
            ksm_zero_pages=zeros if use_zero_pages else 0,
            pages_total=total,
            zero_pages=zeros,
            zero=zero,
            by_kind=by_kind,
        )

    # -- internals --------------------------------------------------------------------------

    def _get(self, task: TaskId) -> SimInstance:
        inst = self._by_task.get(task)
        if inst is None or not inst.alive:
            raise ProcessGone(str(task))
        return inst

    def _buffer(self, n: int) -> np.ndarray:
        buf = getattr(self._local, "buf", None)
        if buf is None or len(buf) < n:
            buf = np.empty((max(n, 256), WORDS), dtype=np.uint64)
            self._local.buf = buf
        return buf[:n]

    def _new_instance(self, app_name: str, index: int) -> SimInstance:
        app = self.workload.app(app_name)
        name = f"{app_name}/{index}"
        model = InstanceModel(self.workload, app, index)
        model.vol_round = self.round
        pid = self._next_pid
        self._next_pid += 1
        task = TaskId(pid, 10_000 + 10 * (pid - FIRST_PID) + self.round)
        maps, starts = self._layout(name, model)
        vpn_parts, key_parts, slices = [], [], {}
        order = sorted(model.sections, key=lambda sid: starts[sid])
        lo = 0
        for sid in order:
            npages = model.sections[sid].npages
            vpn_parts.append(np.arange(starts[sid], starts[sid] + npages, dtype=np.uint64))
            key_parts.append(np.array(model.keys(sid), dtype=np.uint64))
            slices[sid] = (lo, lo + npages)
            lo += npages
        empty = np.zeros(0, dtype=np.uint64)
        inst = SimInstance(
            name=name,
            app=app_name,
            task=task,
            model=model,
            mappings=maps,
            section_start=starts,
            vpns=np.concatenate(vpn_parts) if vpn_parts else empty,
            keys=np.concatenate(key_parts) if key_parts else empty,
            section_slice=slices,
            runtime_ns=app.cpu_ms * 10**6,
        )
        self._instances[name] = inst
        self._by_task[task] = inst
        return inst

    def _layout(self, name: str, model: InstanceModel) -> tuple[list[Mapping], dict[str, int]]:
        """Mappings of one instance with randomised bases (vpns), and each section's first vpn."""
        rng = random.Random(aslr_seed(model.seed, name))
        app = model.app
        maps: list[Mapping] = []
        starts: dict[str, int] = {}

        def add(vpn: int, npages: int, perms: str, file: tuple[int, int] | None = None,
                path: str = "", has_anon: bool = True, area: str = "") -> int:
            # VM_MERGEABLE as the app's `ksm:` opt-in leaves it (mainline ksmd's scope)
            mg = app.ksm_mergeable(area)
            maps.append(Mapping(vpn << PAGE_SHIFT, (vpn + npages) << PAGE_SHIFT, perms, file,
                                path, True, has_anon, vm_mergeable=mg))
            return vpn + npages

        binary = (SIM_DEV, self._bin_ino[app.name])
        bpath = f"/usr/apps/{app.name}/bin/{app.name}"
        vpn = (0x5555_0000_0000 >> PAGE_SHIFT) + rng.randrange(1 << 20)
        vpn = add(vpn, 2, "r--p", binary, bpath, False)
        vpn = add(vpn, 8, "r-xp", binary, bpath, False)
        vpn = add(vpn, 2, "r--p", binary, bpath, False)
        vpn += 1 + rng.randrange(1 << 13)  # brk randomisation
        if "heap" in model.sections:
            starts["heap"] = vpn
            vpn = add(vpn, model.sections["heap"].npages, "rw-p", None, "[heap]", area="heap")
        for a in app.anon:
            vpn += 1 + rng.randrange(16)
            starts[f"anon:{a.name}"] = vpn
            vpn = add(vpn, a.pages, "rw-p", area=a.name)
        top = (0x7F00_0000_0000 >> PAGE_SHIFT) + rng.randrange(1 << 26)
        for lib in self.workload.app_libraries(app):
            size = lib.text_pages + lib.rodata_pages + lib.data_pages + lib.bss_pages
            top -= size + 1 + rng.randrange(16)
            ident = (SIM_DEV, self._lib_ino[lib.name])
            path = f"/usr/lib/{lib.name}"
            v = add(top, lib.text_pages, "r-xp", ident, path, False)
            v = add(v, lib.rodata_pages, "r--p", ident, path, False)
            if lib.data_pages:
                starts[f"lib:{lib.name}:data"] = v
                v = add(v, lib.data_pages, "rw-p", ident, path, True, area="data")
            if lib.bss_pages:
                starts[f"lib:{lib.name}:bss"] = v
                add(v, lib.bss_pages, "rw-p", area="bss")
        if "stack" in model.sections:
            stack_top = (0x7FFC_0000_0000 >> PAGE_SHIFT) + rng.randrange(1 << 20)
            npages = model.sections["stack"].npages
            starts["stack"] = stack_top - npages
            add(stack_top - npages, npages, "rw-p", None, "[stack]", area="stack")
        maps.sort(key=lambda m: m.start)
        return maps, starts


__all__ = ["Effects", "ExpectedSharing", "Sharing", "SimInstance", "SimulatedSource"]
