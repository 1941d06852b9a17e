"""How new policy weights reach the vLLM rollout engines after each PPO step.

`safe_rlhf.weight_sync` picks one of four methods (`make_sync(method)`):

- "checkpoint" (`CheckpointSync`, CPU and fallback): the learner writes a safetensors HF directory,
  each rollout worker reloads it in place (`reload_weights` worker RPC) and resets its prefix cache.
- "gloo" (`GlooSync`, CPU or GPU): vLLM's weight-transfer API with our own backend (registered in
  every vLLM process by the plugin in cluster/vllm_plugin.py): the NCCL method's protocol and call
  order, over a torch gloo group through host memory. Nothing touches the disk; it is how the
  in-memory path runs (and is tested) on a CPU-only machine.
- "nccl" (`NcclSync`, GPU, learner and vLLM on different GPUs): vLLM 0.32's weight-transfer API.
  Learner rank 0 and every vLLM worker process form one NCCL group (learner = rank 0) and the
  learner broadcasts the weights; vLLM loads them through its layerwise-reload path.
- "ipc" (`IpcSync`, GPU, learner and vLLM colocated on the same GPUs): vLLM 0.32's CUDA-IPC
  backend. The learner exports CUDA IPC handles of its (gathered) weights; the vLLM workers map the
  same GPU memory and copy it into the model. Nothing crosses a network.

The engine must be built for the method: `LLM(..., **vllm_engine_kwargs(method))`.

Everything vLLM-specific was written against the installed vllm(-cpu) 0.32.0 sources:
`vllm/entrypoints/rl/offline.py` (the LLM methods), `vllm/v1/worker/gpu_worker.py` (what they run on
each worker), `vllm/distributed/weight_transfer/{base,nccl_common,nccl_engine,ipc_engine,
packed_tensor}.py` (the wire formats). The NCCL and IPC data paths need CUDA and were not run here.

vLLM and torch are imported inside functions only: this module imports on machines without vLLM.
"""
from __future__ import annotations

import hashlib
import logging
import math
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

METHODS = ("checkpoint", "gloo", "nccl", "ipc")
TRANSFER_METHODS = ("gloo", "nccl", "ipc")  # vLLM's weight-transfer API
# vLLM's packed-transfer defaults (vllm/distributed/weight_transfer/packed_tensor.py): 1 GiB buffers,
# two of them, allocated on BOTH sides for the duration of a transfer (outside vLLM's
# gpu_memory_utilization budget). Repeated here so the module needs no vLLM import to be read.
DEFAULT_PACKED_BUFFER_BYTES = 1024 * 1024 * 1024
DEFAULT_PACKED_NUM_BUFFERS = 2


@dataclass(frozen=True)
class SyncStats:
    """What one publish/apply/send cost: wall seconds, payload bytes, and the method."""

    seconds: float
    bytes: int
    method: str


def vllm_engine_kwargs(weight_sync: str, **extra: Any) -> dict[str, Any]:
    """Extra `LLM(...)` kwargs so the engine can receive weights by `weight_sync`.

    checkpoint: nothing (`reload_weights` works on any engine with a disk-loading load_format).
    gloo / nccl / ipc: `weight_transfer_config=WeightTransferConfig(backend=...)`; without it the worker
    has no transfer engine and every transfer call raises "Weight transfer not configured"
    (gpu_worker.py `_check_weight_transfer_engine`). That config is only a backend name; the wire
    params (packed, buffer sizes) travel from the trainer in the init handshake.
    `extra` is merged last (e.g. enable_sleep_mode=True for a colocated engine).
    """
    _check_method(weight_sync)
    kw: dict[str, Any] = {}
    if weight_sync in TRANSFER_METHODS:
        from vllm.config import WeightTransferConfig

        if weight_sync == "gloo":
            from cluster.vllm_plugin import register

            register()  # this process; vLLM's engine and worker processes load it as a plugin

        kw["weight_transfer_config"] = WeightTransferConfig(backend=weight_sync)
    kw.update(extra)
    return kw


def make_sync(method: str) -> "CheckpointSync | GlooSync | NcclSync | IpcSync":
    """A fresh sync object for `method` ("checkpoint" | "gloo" | "nccl" | "ipc")."""
    _check_method(method)
    return CheckpointSync() if method == "checkpoint" else transfer_class(method)()


def transfer_class(method: str) -> "type[GlooSync] | type[NcclSync] | type[IpcSync]":
    """The class whose static rollout-side calls (init, apply, ...) serve a transfer `method`."""
    if method not in TRANSFER_METHODS:
        raise ValueError(f"{method!r} is not a weight-transfer method; choose one of {', '.join(TRANSFER_METHODS)}")
    return {"gloo": GlooSync, "nccl": NcclSync, "ipc": IpcSync}[method]


def _check_method(method: str) -> None:
    if method not in METHODS:
        raise ValueError(f"unknown weight_sync method {method!r}; choose one of {', '.join(METHODS)}")


def _reset_prefix_cache(llm: Any) -> None:
    # vLLM does not do this itself after a weight update (neither reload_weights nor
    # finish_weight_update touches the scheduler): KV blocks cached under the old policy would be
    # reused for shared prompt prefixes, i.e. silently off-policy rollouts.
    if not llm.reset_prefix_cache():
        raise RuntimeError("vLLM refused to reset its prefix cache (requests still running during the weight sync?)")


def _dtype_name(dtype: "torch.dtype") -> str:
    return str(dtype).split(".")[-1]  # torch.bfloat16 -> "bfloat16"; the worker does getattr(torch, name)


def _payload_bytes(update_info: Mapping[str, Any]) -> int:
    import torch

    return sum(math.prod(shape) * getattr(torch, dt).itemsize
               for dt, shape in zip(update_info["dtype_names"], update_info["shapes"]))


# ================================================================== checkpoint
class CheckpointSync:
    """Safetensors directory on disk (or /dev/shm) + in-place reload on every rollout worker.

    Trainer (learner rank 0, after ZeRO-3 consolidation if any): `path = sync.publish(...)`.
    Driver: hand `path` to every rollout worker; each calls `CheckpointSync.apply(llm, path)`.
    The driver removes a published directory (`CheckpointSync.discard`) only after every worker
    has applied it.

    /dev/shm is node-local: pass `prefer_shm=False` (and a shared-filesystem `out_dir`) when a
    rollout worker may sit on another node than the learner. tmpfs pages also count against the
    writer's memory limit (cgroup), hence the room check with headroom.
    """

    method = "checkpoint"

    def __init__(self, prefer_shm: bool = True, shm_root: str = "/dev/shm", headroom: float = 1.25,
                 max_shard_size: str = "5GB"):
        self.prefer_shm = prefer_shm
        self.shm_root = shm_root
        self.headroom = headroom
        self.max_shard_size = max_shard_size
        self.last_stats: SyncStats | None = None

    # ---------------------------------------------------------------- trainer side
    def publish(self, weights: Any, tokenizer: Any, out_dir: str | os.PathLike, *, config: Any = None,
                dtype: "torch.dtype | None" = None) -> str:
        """Write `weights` as an HF safetensors directory, atomically; return its path.

        weights: an HF `PreTrainedModel` (or a wrapper with `.module`, e.g. a ZeRO 0-2 DeepSpeed
          engine), or a full state dict {hf_name: tensor}. A ZeRO-3 module is refused: its
          parameters are partitioned, so consolidate first (e.g. DeepSpeed's
          `_zero3_consolidated_16bit_state_dict()`, a collective on all ranks) and pass the dict.
        tokenizer: saved alongside (None to skip); vLLM does not reload it, but the directory stays
          a complete from_pretrained() target.
        out_dir: where the directory goes when /dev/shm is not used (or lacks room). With /dev/shm
          the directory is /dev/shm/safe_rlhf_weights/<basename>-<hash of out_dir>, so use the
          returned path, not out_dir.
        config: needed with a state dict: a `PretrainedConfig` or a model directory whose
          config.json (and generation_config.json) are copied.
        dtype: cast floating tensors before writing (e.g. torch.bfloat16 halves fp32 payloads).

        Written to a temp dir on the same filesystem, then renamed: a reader never sees a
        half-written directory. Stats of the write land in `self.last_stats`.
        """
        import torch

        t0 = time.perf_counter()
        module, state = _split_weights(weights)
        if state is not None and config is None:
            raise ValueError("publish(state_dict, ...) needs config= (a PretrainedConfig or a model directory)")
        tensors = state.values() if state is not None else module.state_dict().values()
        est = sum(t.numel() * (dtype.itemsize if dtype is not None and t.is_floating_point() else t.element_size())
                  for t in tensors)
        final = self._target_dir(Path(out_dir), est)
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))  # same fs => atomic rename
        try:
            with torch.no_grad():
                if module is not None:
                    sd = None if dtype is None else {k: (v.to(dtype) if v.is_floating_point() else v)
                                                     for k, v in module.state_dict().items()}
                    module.save_pretrained(str(tmp), state_dict=sd, max_shard_size=self.max_shard_size)
                else:
                    _save_state_dict(state, tmp, config, dtype, self.max_shard_size)
            if tokenizer is not None:
                tokenizer.save_pretrained(str(tmp))
            os.chmod(tmp, 0o755)  # mkdtemp makes it 0700
            _swap_into_place(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        self.last_stats = SyncStats(time.perf_counter() - t0, _safetensors_bytes(final), self.method)
        return str(final)

    def _target_dir(self, out_dir: Path, est_bytes: int) -> Path:
        if self.prefer_shm and os.path.isdir(self.shm_root):
            free = shutil.disk_usage(self.shm_root).free
            if free >= est_bytes * self.headroom + (64 << 20):
                tag = hashlib.sha1(str(out_dir.resolve()).encode()).hexdigest()[:8]
                return Path(self.shm_root) / "safe_rlhf_weights" / f"{out_dir.name}-{tag}"
            log.info("weight_sync: %s has %.1f GiB free, need ~%.1f GiB; writing to %s",
                     self.shm_root, free / 2**30, est_bytes * self.headroom / 2**30, out_dir)
        return out_dir

    @staticmethod
    def discard(path: str | os.PathLike) -> None:
        """Remove a published directory (after every rollout worker has applied it)."""
        shutil.rmtree(path, ignore_errors=True)

    # ---------------------------------------------------------------- rollout side
    @staticmethod
    def apply(llm: Any, path: str | os.PathLike) -> SyncStats:
        """Reload `path` into `llm` in place (every TP worker reads the files) and reset the prefix cache.

        Runs GPUModelRunner.reload_weights(weights_path=..., is_checkpoint_format=True) on each
        worker: layerwise reload + load_weights + post-processing (quantization repacking etc.).
        Side effect: the worker's model_config.model now points at `path`.
        """
        t0 = time.perf_counter()
        llm.collective_rpc("reload_weights", kwargs={"weights_path": str(path), "is_checkpoint_format": True})
        _reset_prefix_cache(llm)
        return SyncStats(time.perf_counter() - t0, _safetensors_bytes(Path(path)), CheckpointSync.method)


def _split_weights(weights: Any) -> tuple[Any, dict | None]:
    """(module, None) for an HF model (unwrapping `.module`), (None, state_dict) for a mapping."""
    if isinstance(weights, Mapping):
        return None, dict(weights)
    module = weights if hasattr(weights, "save_pretrained") else getattr(weights, "module", None)
    if module is None or not hasattr(module, "save_pretrained"):
        raise TypeError(f"publish() takes an HF PreTrainedModel or a state dict, not {type(weights).__name__}")
    if any(hasattr(p, "ds_shape") and p.numel() == 0 for p in module.parameters()):
        raise ValueError("ZeRO-3 partitioned module: consolidate a full state dict first and publish that")
    return module, None


def _save_state_dict(state: dict, tmp: Path, config: Any, dtype: "torch.dtype | None", max_shard_size: str) -> None:
    from huggingface_hub import save_torch_state_dict

    if isinstance(config, (str, os.PathLike)):
        for name in ("config.json", "generation_config.json"):
            if (Path(config) / name).is_file():
                shutil.copy2(Path(config) / name, tmp / name)
    else:
        config.save_pretrained(str(tmp))
    cpu = {}
    for k, v in state.items():
        v = v.detach()
        if dtype is not None and v.is_floating_point():
            v = v.to(dtype)
        cpu[k] = v.to("cpu")
    # Tied weights (lm_head sharing the embedding's storage) are written once. huggingface_hub keeps
    # the alphabetically first name by default, i.e. lm_head.weight, but vLLM skips lm_head for tied
    # models and would then never load the embedding: keep the embedding's name instead.
    discard = [k for k in cpu if k.startswith("lm_head.") or ".lm_head." in k]
    save_torch_state_dict(cpu, str(tmp), max_shard_size=max_shard_size, shared_tensors_to_discard=discard)


def _swap_into_place(tmp: Path, final: Path) -> None:
    # rename(2) cannot replace a non-empty directory: move the old one aside first. A reader that
    # already opened (mmapped) the old files keeps them until it closes them.
    if final.exists():
        old = final.with_name(f".{final.name}.old-{uuid.uuid4().hex[:8]}")
        os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, final)


def _safetensors_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


# ================================================================== vLLM transfer API (shared rollout side)
class _TransferSync:
    """Rollout side of vLLM 0.32's weight-transfer API, as the `LLM` methods expose it
    (vllm/entrypoints/rl/offline.py, RLOfflineMixin). Each LLM call is a collective_rpc that
    runs the same-named method of every TP/PP worker of that engine (gpu_worker.py ~L1484-1602).
    Stateless here (vLLM holds the state), so these are static methods.
    """

    method = ""

    @staticmethod
    def init(llm: Any, init_info: Mapping[str, Any]) -> None:
        """LLM.init_weight_transfer_engine: worker parses `init_info` into the backend's InitInfo
        dataclass (NCCL: joins the NCCL group and BLOCKS until every rank has joined)."""
        from vllm.distributed.weight_transfer.base import WeightTransferInitRequest

        llm.init_weight_transfer_engine(WeightTransferInitRequest(init_info=dict(init_info)))

    @staticmethod
    def start(llm: Any) -> None:
        """LLM.start_weight_update: opens a session (initialize_layerwise_reload on the model)."""
        llm.start_weight_update()

    @staticmethod
    def update(llm: Any, update_info: Mapping[str, Any]) -> None:
        """LLM.update_weights: receive one batch of weights and load_weights() them (may repeat)."""
        from vllm.distributed.weight_transfer.base import WeightTransferUpdateRequest

        llm.update_weights(WeightTransferUpdateRequest(update_info=dict(update_info)))

    @staticmethod
    def finish(llm: Any, weight_version: str | None = None) -> None:
        """LLM.finish_weight_update: finalize_layerwise_reload (post-processing, e.g. quantization),
        optionally records `weight_version`; then our prefix-cache reset, which vLLM does not do."""
        llm.finish_weight_update(weight_version)
        _reset_prefix_cache(llm)

    @classmethod
    def apply(cls, llm: Any, update_info: Mapping[str, Any], weight_version: str | None = None) -> SyncStats:
        """One whole update with a single update_info: start, update, finish (+ prefix-cache reset)."""
        t0 = time.perf_counter()
        cls.start(llm)
        cls.update(llm, update_info)
        cls.finish(llm, weight_version)
        return SyncStats(time.perf_counter() - t0, _payload_bytes(update_info), cls.method)


def transfer_metadata(named_params: Iterable[tuple[str, Any]], dtype: "torch.dtype | None" = None) -> dict[str, list]:
    """The per-round update_info {names, dtype_names, shapes} for `named_params`, without gathering.

    ZeRO-3 partitioned parameters report an empty `.shape`; their full shape is `ds_shape`.
    `dtype`: the dtype the sender will put on the wire (when it casts, e.g. fp32 master -> bf16).
    Names must be the HF checkpoint names vLLM's `load_weights` expects ("model.layers.0...."),
    and the order must be exactly the order `send` will yield the tensors in.
    """
    names, dtype_names, shapes = [], [], []
    for name, p in named_params:
        names.append(name)
        dtype_names.append(_dtype_name(dtype if dtype is not None else p.dtype))
        shapes.append([int(s) for s in getattr(p, "ds_shape", p.shape)])
    return {"names": names, "dtype_names": dtype_names, "shapes": shapes}


def _checked(named_tensors: Iterable[tuple[str, "torch.Tensor"]], expected: Mapping[str, Any] | None,
             counter: list[int]) -> Iterator[tuple[str, "torch.Tensor"]]:
    """Yield the caller's (name, tensor) pairs, checked against what the workers were told.

    A mismatch would make both sides cut the byte stream differently: an NCCL hang or garbage
    weights. Fail on the trainer, naming the parameter, instead (as vLLM's own sender does).
    Also makes each tensor safe to read on whatever stream the consumer is on (see below).
    """
    import torch

    n = len(expected["names"]) if expected is not None else None
    i = 0
    for name, t in named_tensors:
        t = t.detach()
        if expected is not None:
            if i >= n:
                raise ValueError(f"sender yielded more tensors than the {n} announced; first extra is {name!r}")
            want = (expected["names"][i], expected["dtype_names"][i], list(expected["shapes"][i]))
            got = (name, _dtype_name(t.dtype), list(t.shape))
            if want != got:
                raise ValueError(f"tensor #{i} disagrees with the announced metadata: announced {want}, got {got}")
        if t.is_cuda:
            # The consumer (vLLM's packed producer) reads on its own side stream, current while this
            # generator runs. Make that stream wait for work queued on the default stream (e.g. a cast),
            # and tell the caching allocator it uses the block, so a ZeRO-3 gather buffer freed by the
            # caller's next step is not reused before the copy out of it has run. (Not run on a GPU here.)
            stream = torch.cuda.current_stream()
            stream.wait_stream(torch.cuda.default_stream())
            t.record_stream(stream)
        counter[0] += t.numel() * t.element_size()
        i += 1
        yield name, t
    if n is not None and i != n:
        raise ValueError(f"sender yielded {i} tensors but {n} were announced; the workers wait for the rest")


def _broadcast_send(sync: "GlooSync | NcclSync", named_tensors: Iterable[tuple[str, "torch.Tensor"]],
                    update_info: Mapping[str, Any] | None,
                    broadcast: Callable[[Iterator[tuple[str, "torch.Tensor"]]], None]) -> SyncStats:
    """The trainer side of the broadcast methods: rank 0 checks each tensor against `update_info`
    and hands them to `broadcast`; other ranks drain the iterator (ZeRO-3 gathers are collectives)."""
    import torch

    t0 = time.perf_counter()
    counter = [0]
    with torch.no_grad():
        if not sync.is_sender:
            for _ in named_tensors:
                pass
            return SyncStats(time.perf_counter() - t0, 0, sync.method)
        if sync.group is None:
            raise RuntimeError(f"{type(sync).__name__}.send before trainer_init")
        broadcast(_checked(named_tensors, update_info, counter))
    return SyncStats(time.perf_counter() - t0, counter[0], sync.method)


# ================================================================== nccl
class NcclSync(_TransferSync):
    """vLLM NCCL weight transfer: learner rank 0 broadcasts into every vLLM worker process.

    Group layout: rank 0 = learner rank 0 (the only learner process in the group); then each
    rollout engine's workers. A vLLM worker's rank is rank_offset + dp_index * (TP*PP) + its rank
    within the engine (nccl_common.worker_init_process_group). Our rollout workers are separate
    `LLM`s, all with dp_index 0, so each must get its own rank_offset: 1, 1 + ws_0, 1 + ws_0 + ws_1...
    (`worker_init_infos` does this). vLLM's own trainer engine sends one payload with
    rank_offset=1 to every engine, which is only right for a single (or one DP-sharded) engine.

    The driver's call order (every "concurrently" means: issue all the Ray calls, then ray.get them
    together, because the calls rendezvous inside NCCL and each blocks until all have arrived):

      once:
        1. addr, port = learner_rank0.NcclSync.pick_master()        (in learner rank 0's process)
        2. infos = NcclSync.worker_init_infos(addr, port, [llm.get_world_size() per rollout worker],
                                              packed=...)
        3. CONCURRENTLY: learner ranks: sync.trainer_init(infos[0], rank=r)
                         rollout i:     NcclSync.init(llm, infos[i])      (all of them)
        4. meta = learner_rank0: transfer_metadata(named params[, dtype])  (static; reuse each step)
      each PPO step, after optimizer.step():
        5. CONCURRENTLY: rollout i:     NcclSync.apply(llm, meta, weight_version=str(step))
                                        (start -> update [blocks in the broadcast] -> finish -> reset)
                         learner ranks: sync.send(named_tensors, meta)
           ZeRO-3: every learner rank must run send(), iterating the same layer-by-layer gathers
           (they are collectives); only rank 0 broadcasts. Rollout workers must be idle (a Ray
           actor runs one call at a time, so apply simply queues behind a running generate).
      teardown: sync.shutdown() on the learner; llm.shutdown_weight_transfer_engine() on rollouts.

    If send raises mid-transfer the workers stay blocked in NCCL: the group is unusable, the
    driver must tear down (kill) the rollout workers and re-init. NCCL needs distinct GPUs for
    learner rank 0 and every vLLM worker; colocated on one GPU use "ipc".
    """

    method = "nccl"

    def __init__(self) -> None:
        self.group: Any = None  # vLLM PyNcclCommunicator, rank 0 only
        self.is_sender = False
        self.packed = True
        self.packed_buffer_size_bytes = DEFAULT_PACKED_BUFFER_BYTES
        self.packed_num_buffers = DEFAULT_PACKED_NUM_BUFFERS

    @staticmethod
    def pick_master() -> tuple[str, int]:
        """(ip, free port) of THIS process's node; call it in learner rank 0, which hosts the TCPStore."""
        from vllm.utils.network_utils import get_ip, get_open_port

        return get_ip(), get_open_port()

    @staticmethod
    def worker_init_infos(master_address: str, master_port: int, worker_world_sizes: Sequence[int], *,
                          packed: bool = True, packed_buffer_size_bytes: int = DEFAULT_PACKED_BUFFER_BYTES,
                          packed_num_buffers: int = DEFAULT_PACKED_NUM_BUFFERS) -> list[dict[str, Any]]:
        """One init_info per rollout worker (`worker_world_sizes[i]` = its llm.get_world_size()).

        Each dict is an NCCLWeightTransferInitInfo payload (nccl_common.py): master_address,
        master_port, rank_offset, world_size, packed, packed_buffer_size_bytes, packed_num_buffers.
        The packed params are "must agree" wire params: the trainer reads them from infos[0].
        """
        from vllm.distributed.weight_transfer.nccl_common import NCCLWeightTransferInitInfo, worker_init_payload

        world_size = 1 + sum(worker_world_sizes)
        infos, offset = [], 1
        for ws in worker_world_sizes:
            info = NCCLWeightTransferInitInfo(
                master_address=master_address, master_port=int(master_port), rank_offset=offset,
                world_size=world_size, packed=packed, packed_buffer_size_bytes=packed_buffer_size_bytes,
                packed_num_buffers=packed_num_buffers)
            infos.append(worker_init_payload(info))  # drops the unused unique-id field
            offset += ws
        return infos

    # ---------------------------------------------------------------- trainer side
    def trainer_init(self, init_info: Mapping[str, Any], rank: int = 0) -> None:
        """Join the group as NCCL rank 0 (learner rank 0 only; other ranks just record their rank).

        Blocks until every vLLM worker has entered `init` (TCPStore rendezvous, then NCCL init and a
        warm-up all_reduce): issue it concurrently with the rollout workers' `init`. Uses the
        current CUDA device (torch.accelerator.current_device_index()); set it first.
        """
        self.is_sender = rank == 0
        self.packed = bool(init_info.get("packed", True))
        self.packed_buffer_size_bytes = int(init_info.get("packed_buffer_size_bytes", DEFAULT_PACKED_BUFFER_BYTES))
        self.packed_num_buffers = int(init_info.get("packed_num_buffers", DEFAULT_PACKED_NUM_BUFFERS))
        if not self.is_sender:
            return
        from vllm.distributed.weight_transfer.nccl_common import trainer_init

        self.group = trainer_init({k: init_info[k] for k in ("master_address", "master_port", "world_size")}, rank=0)

    def send(self, named_tensors: Iterable[tuple[str, "torch.Tensor"]],
             update_info: Mapping[str, Any] | None = None) -> SyncStats:
        """Broadcast the tensors (rank 0); drain the iterator (other ranks, to keep ZeRO-3 gathers collective).

        named_tensors: full (gathered) tensors, in exactly the order of the `update_info` the workers
          got; a generator that gathers layer by layer keeps peak memory at one layer (packed mode
          copies into its own buffers, so a tensor may be released as soon as the next is requested).
        update_info: that metadata; when given, each tensor is checked against it before it is sent.
        Returns once the broadcast has completed on this GPU.
        """
        return _broadcast_send(self, named_tensors, update_info, self._broadcast)

    def _broadcast(self, pairs: Iterator[tuple[str, "torch.Tensor"]]) -> None:
        import torch

        torch.cuda.synchronize()  # the optimizer step's kernels must have landed before we read params
        if self.packed:
            from vllm.distributed.weight_transfer.packed_tensor import packed_nccl_broadcast_producer

            packed_nccl_broadcast_producer(iterator=pairs, group=self.group, src=0,
                                           post_iter_func=lambda item: item[1],
                                           buffer_size_bytes=self.packed_buffer_size_bytes,
                                           num_buffers=self.packed_num_buffers)
        else:
            stream = torch.cuda.current_stream()
            for _, t in pairs:
                # NCCL sends numel elements from data_ptr(): never a non-contiguous view.
                self.group.broadcast(t.contiguous(), src=0, stream=stream)
        torch.cuda.current_stream().synchronize()

    def shutdown(self) -> None:
        if self.group is not None:
            self.group.destroy()
            self.group = None


# ================================================================== gloo
def join_gloo_group(master_address: str, master_port: int, rank: int, world_size: int,
                    timeout_s: float = 600.0) -> Any:
    """A torch gloo ProcessGroup of `world_size` processes, outside torch.distributed's global state
    (a learner already has its default group, vLLM its own). Rank 0 hosts the TCPStore; every
    rank blocks here until all have joined."""
    import datetime

    import torch.distributed as dist

    timeout = datetime.timedelta(seconds=timeout_s)
    store = dist.TCPStore(master_address, int(master_port), world_size, is_master=rank == 0, timeout=timeout,
                          wait_for_workers=False)
    return dist.ProcessGroupGloo(dist.PrefixStore("safe_rlhf_weights/", store), rank, world_size, timeout)


def gloo_broadcast(group: Any, tensor: "torch.Tensor", src: int = 0) -> None:
    """Broadcast `tensor` (contiguous, in host memory) in place from `src`, as raw bytes: the bytes
    of any dtype travel the same way (gloo lacks reductions for some dtypes; a copy needs none)."""
    import torch
    import torch.distributed as dist

    opts = dist.BroadcastOptions()
    opts.rootRank = src
    group.broadcast([tensor.reshape(-1).view(torch.uint8)], opts).wait()


class GlooSync(_TransferSync):
    """Weight transfer over a gloo group: NcclSync's protocol through host memory (CPU or GPU).

    Same group layout (rank 0 = learner rank 0, then every rollout engine's workers, each engine
    with its own rank_offset) and the same driver call order as `NcclSync` (see there): pick_master
    in learner rank 0, `worker_init_infos`, then CONCURRENTLY `trainer_init` on the learner ranks and
    `GlooSync.init(llm, info)` on the rollout workers; each step CONCURRENTLY `GlooSync.apply(llm,
    meta, version)` on the rollout workers and `send(named_tensors, meta)` on the learner ranks.
    The vLLM side is `cluster.vllm_plugin.GlooWeightTransferEngine` (backend name "gloo").
    One broadcast per tensor; GPU tensors are staged through host memory on both sides, so on a GPU
    cluster prefer "nccl" (this method is for CPU runs and for checking the protocol without GPUs).
    """

    method = "gloo"

    def __init__(self) -> None:
        self.group: Any = None  # rank 0 only
        self.is_sender = False

    @staticmethod
    def pick_master() -> tuple[str, int]:
        """(ip, free port) of THIS process's node; call it in learner rank 0, which hosts the TCPStore."""
        from actors.learner import host_and_free_port

        return host_and_free_port()

    @staticmethod
    def worker_init_infos(master_address: str, master_port: int,
                          worker_world_sizes: Sequence[int]) -> list[dict[str, Any]]:
        """One init_info per rollout worker (`worker_world_sizes[i]` = its engine's TP*PP size);
        the trainer uses infos[0] (it only needs address, port and world size)."""
        world_size = 1 + sum(worker_world_sizes)
        infos, offset = [], 1
        for ws in worker_world_sizes:
            infos.append({"master_address": master_address, "master_port": int(master_port),
                          "rank_offset": offset, "world_size": world_size})
            offset += ws
        return infos

    def trainer_init(self, init_info: Mapping[str, Any], rank: int = 0) -> None:
        """Join as rank 0 (learner rank 0 only); blocks until every rollout worker has joined."""
        self.is_sender = rank == 0
        if self.is_sender:
            self.group = join_gloo_group(init_info["master_address"], init_info["master_port"], 0,
                                         init_info["world_size"])

    def send(self, named_tensors: Iterable[tuple[str, "torch.Tensor"]],
             update_info: Mapping[str, Any] | None = None) -> SyncStats:
        """Broadcast the tensors, in `update_info`'s order (rank 0); other ranks drain the iterator
        (ZeRO-3 gathers are collectives)."""
        return _broadcast_send(self, named_tensors, update_info, self._broadcast)

    def _broadcast(self, pairs: Iterator[tuple[str, "torch.Tensor"]]) -> None:
        for _, t in pairs:
            gloo_broadcast(self.group, t.to("cpu").contiguous())

    def shutdown(self) -> None:
        self.group = None


# ================================================================== ipc
class IpcSync(_TransferSync):
    """vLLM CUDA-IPC weight transfer between colocated learner ranks and vLLM workers.

    What travels: per tensor (unpacked) or per packed chunk, a dict {physical GPU UUID:
    rebuild_cuda_tensor args} from torch's `reduce_tensor` (a cudaIpcMemHandle, offsets, sizes,
    a refcount handle). Every learner rank exports handles of its own copy; the handle dicts are
    all-gathered over the learner's default torch.distributed group and merged, so one update_info
    holds one handle per GPU, and each vLLM worker maps the one whose UUID is its own GPU's
    (ipc_engine.py receive_weights). So every GPU of a rollout engine needs a learner rank on it.
    The update_info dicts ride Ray's pickling as they are (no base64; that is for HTTP only).

    No rendezvous: init only ships {"packed": bool}. Two ways to run an update:

    unpacked (simple; the driver orchestrates, like NCCL but sequential):
        once:      info0 = sync.trainer_init(rank=r, packed=False) on every learner rank;
                   IpcSync.init(llm, info0) on every rollout worker.
        each step: 1. learner ranks (all): info = sync.export(named_tensors)  -> rank 0 returns it
                   2. rollout workers (all, concurrently): IpcSync.apply(llm, info, str(step))
                   3. learner ranks (all): sync.release()   (only after EVERY apply has returned)
        Costs one full copy of the weights per GPU while exported when tensors are gathered
        (ZeRO-3); ZeRO 0-2 parameters are exported in place (no copy).

    packed (bounded memory: one `packed_buffer_size_bytes` buffer per learner GPU, reused per chunk):
        once:      info0 = sync.trainer_init(rank=r, packed=True); IpcSync.init(llm, info0) on rollouts.
        each step: 1. rollout workers: IpcSync.start(llm)
                   2. learner ranks (all): sync.send(named_tensors, push) where `push(update_info)`
                      (called on rank 0 once per chunk) runs IpcSync.update(llm, update_info) on every
                      rollout worker and returns only when all are done, e.g.
                      lambda info: ray.get([w.ipc_update.remote(info) for w in rollout_workers])
                   3. rollout workers: IpcSync.finish(llm, str(step))
        The learner must hold the rollout workers' handles; chunks cannot be queued (the buffer
        is overwritten by the next chunk).

    Not run on a GPU here. Learner and vLLM must be able to share the GPU (Ray fractional GPUs),
    and vLLM's memory budget must leave room for the learner. If the engine sleeps during training
    (vllm_engine_kwargs("ipc", enable_sleep_mode=True); llm.sleep(level=...)), call
    llm.wake_up(tags=["weights"]) before start: the layerwise reload copies into the weight buffers,
    which level 2 unmaps. Then llm.wake_up(tags=["kv_cache"]) after finish, before generating.
    """

    method = "ipc"

    def __init__(self) -> None:
        self.rank = 0
        self.packed = False
        self.packed_buffer_size_bytes = DEFAULT_PACKED_BUFFER_BYTES
        self._refs: list[Any] = []  # exported tensors: must stay alive until every consumer is done

    # ---------------------------------------------------------------- trainer side
    def trainer_init(self, rank: int = 0, packed: bool = False,
                     packed_buffer_size_bytes: int = DEFAULT_PACKED_BUFFER_BYTES) -> dict[str, Any]:
        """Record this learner rank's settings; returns the init_info for every rollout worker's `init`
        (an IPCWeightTransferInitInfo payload: only `packed`, which both sides must agree on)."""
        self.rank, self.packed, self.packed_buffer_size_bytes = rank, packed, packed_buffer_size_bytes
        return {"packed": packed}

    @staticmethod
    def _gpu_uuid() -> str:
        import torch

        return str(torch.cuda.get_device_properties(torch.cuda.current_device()).uuid)

    def _merge(self, handles: list[dict]) -> list[dict]:
        """All-gather [{uuid: args}, ...] over the learner's default group; rank 0 merges per index.
        A collective: every learner rank must call it the same number of times."""
        import torch
        import torch.distributed as dist

        if not dist.is_initialized() or dist.get_world_size() == 1:
            return handles
        gathered: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, handles)
        torch.cuda.synchronize()
        if self.rank != 0:
            return [{} for _ in handles]
        merged = []
        for i in range(len(handles)):
            m: dict = {}
            for rank_handles in gathered:
                m.update(rank_handles[i])
            merged.append(m)
        return merged

    def export(self, named_tensors: Iterable[tuple[str, "torch.Tensor"]]) -> dict[str, Any] | None:
        """Unpacked: IPC handles for every tensor (all learner ranks). Rank 0 returns the
        IPCWeightTransferUpdateInfo payload {names, dtype_names, shapes, ipc_handles}; others None.
        The tensors stay referenced until `release()`."""
        import torch
        from torch.multiprocessing.reductions import reduce_tensor

        if self.packed:
            raise RuntimeError("IpcSync.export is the unpacked path; this sync was initialised packed=True")
        self.release()
        torch.cuda.synchronize()  # optimizer writes must have landed before another process reads
        uid = self._gpu_uuid()
        names, dtype_names, shapes, handles = [], [], [], []
        with torch.no_grad():
            for name, t in named_tensors:
                t = t.detach().contiguous()  # a fresh copy only for non-contiguous views / gathered params
                self._refs.append(t)  # reduce_tensor's args do not keep the storage alive
                names.append(name)
                dtype_names.append(_dtype_name(t.dtype))
                shapes.append(list(t.shape))
                handles.append({uid: reduce_tensor(t)[1]})
        torch.cuda.synchronize()
        handles = self._merge(handles)
        if self.rank != 0:
            return None
        return {"names": names, "dtype_names": dtype_names, "shapes": shapes, "ipc_handles": handles}

    def release(self) -> None:
        """Drop exported tensors and let torch reclaim the IPC-shared blocks (all learner ranks,
        after every rollout worker's finish/apply has returned: vLLM's layerwise reload may still
        hold views of them until finish_weight_update)."""
        if not self._refs:
            return
        import torch
        import torch.distributed as dist

        self._refs.clear()
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.barrier()
        torch.cuda.ipc_collect()

    def shutdown(self) -> None:
        self.release()

    def send(self, named_tensors: Iterable[tuple[str, "torch.Tensor"]],
             push: Callable[[dict[str, Any]], None]) -> SyncStats:
        """Run the data plane of one update on every learner rank; rank 0 calls `push(update_info)`.

        packed=True: one call of push per chunk, with {names, dtype_names, shapes, ipc_handles,
        tensor_sizes}; push must return only when every rollout worker has loaded the chunk.
        packed=False: export, one push with the whole payload, release.
        The rollout workers' start/finish stay with the driver (see the class docstring).
        """
        import torch

        t0 = time.perf_counter()
        nbytes = 0
        if not self.packed:
            info = self.export(named_tensors)
            nbytes = sum(t.numel() * t.element_size() for t in self._refs)
            if info is not None:
                push(info)
            self.release()
            return SyncStats(time.perf_counter() - t0, nbytes, self.method)

        import torch.distributed as dist
        from vllm.distributed.weight_transfer.packed_tensor import packed_ipc_producer

        multi = dist.is_initialized() and dist.get_world_size() > 1
        # The last step's buffer is reclaimable only once the workers' finish_weight_update has closed
        # their mapping, which happens after our previous send returned: collect it now.
        torch.cuda.ipc_collect()
        torch.cuda.synchronize()
        with torch.no_grad():
            for chunk in packed_ipc_producer(iterator=iter(named_tensors), gpu_uuid=self._gpu_uuid(),
                                             post_iter_func=lambda item: item[1].detach(),
                                             buffer_size_bytes=self.packed_buffer_size_bytes):
                handle = self._merge([chunk.ipc_handle])[0]
                nbytes += sum(chunk.tensor_sizes)
                if self.rank == 0:
                    push({"names": chunk.names, "dtype_names": chunk.dtype_names, "shapes": chunk.shapes,
                          "ipc_handles": handle, "tensor_sizes": chunk.tensor_sizes})
                # Every rank waits here: the producer overwrites its one buffer with the next chunk, and
                # only rank 0 knows (from push returning) that the consumers have finished reading it.
                if multi:
                    dist.barrier()
        torch.cuda.ipc_collect()
        return SyncStats(time.perf_counter() - t0, nbytes, self.method)
