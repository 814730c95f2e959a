"""The training run: data, engine, loop, checkpoints, export.

One call of ``run(cfg)`` per Hydra job. Every rank executes the same sequence of
collectives; per-step decisions that must agree (skip a non-finite step, stop on a
signal) come from one all-reduce at the end of each step.

Exit codes of ``python -m train``: 0 finished or preempted (checkpoint saved),
2 invalid config or input data, 3 checkpoint save failed (``checkpoint.on_save_error=stop``),
4 too many consecutive non-finite steps, 5 unusable checkpoint on resume.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from pathlib import Path

import numpy as np
import torch

from train import checkpointer
from train.checkpoint import CheckpointError, config_hash
from train.signals import StopRequest


class NonFiniteError(RuntimeError):
    """Too many consecutive steps with a non-finite loss or gradient."""


class SaveError(RuntimeError):
    """A checkpoint could not be written and ``checkpoint.on_save_error`` is ``stop``."""


class _NanGrad(torch.autograd.Function):
    """Identity forward, NaN gradient: fault injection for ``debug.nan_grad_at_steps``."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return g * float("nan")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _to_plain(cfg) -> dict:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(cfg, resolve=True)


def _data_dir(cfg) -> Path:
    from data.prepare import default_out_dir
    from data.sources import data_config_from_dict
    from data.tokenizer import tokenizer_config_from_dict

    return default_out_dir(data_config_from_dict(_to_plain(cfg.data)), tokenizer_config_from_dict(_to_plain(cfg.tokenizer)))


def prepare_data(cfg, rank: int, log) -> Path:
    """The prepared shard directory; rank 0 tokenises the source first if it is missing. The
    default directory (``outputs/data/<data.name>-<tokenizer.name>``) is refused when it was
    prepared from a different data config (same name, changed source); one named by
    ``data.out_dir`` is used as it is, with a warning."""
    import torch.distributed as dist

    from data.prepare import stale_preparation
    from data.sources import data_config_from_dict

    out = _data_dir(cfg)
    err = stale_preparation(out, data_config_from_dict(_to_plain(cfg.data))) if rank == 0 else None
    if err and cfg.data.get("out_dir"):  # a directory named explicitly is used as it is
        log(f"warning: {err.split(':')[0]}; using it because data.out_dir names it")
        err = None
    if rank == 0 and err is None and not (out / "meta.json").is_file():
        from data.prepare import prepare

        try:
            log(f"no prepared data in {out}: running data.prepare")
            prepare(_to_plain(cfg.data), _to_plain(cfg.tokenizer), out, log=log)
        except Exception as e:
            err = f"data.prepare failed for {out}: {e}"
    box = [err]
    dist.broadcast_object_list(box, src=0)
    if box[0]:
        raise ValueError(box[0])
    return out


def _source_token_counts(init_from: str, vocab_size: int):
    """Per token id, its count in the training shards of the run ``init_from`` names (its run dir,
    or its export dir inside one): found from the run's config.yaml as that run found them."""
    from omegaconf import OmegaConf

    from data.loader import resolve_shards
    from data.shards import Shard, token_counts

    src = Path(init_from)
    run = src if (src / "config.yaml").is_file() else src.parent
    if not (run / "config.yaml").is_file():
        raise ValueError(f"train.init_redraw_unseen_embeddings: no config.yaml in {src} or its parent, so "
                         f"the data that run trained on is unknown")
    data = _data_dir(OmegaConf.load(run / "config.yaml"))
    if not (data / "meta.json").is_file():
        raise ValueError(f"train.init_redraw_unseen_embeddings: {run}'s training data {data} is not there")
    paths, _ = resolve_shards(data, "train")
    return token_counts([Shard(p) for p in paths], vocab_size)


def build_loader(cfg, data_dir: Path, split: str, rank: int, world_size: int, vocab_size: int, shuffle=True):
    from data.loader import PackedLoader

    return PackedLoader(data_dir, split=split, seq_len=int(cfg.train.seq_len),
                        micro_batch_size=int(cfg.train.micro_batch_size), rank=rank, world_size=world_size,
                        seed=int(cfg.seed), shuffle=shuffle, prefetch=2, num_workers=1)


class Trainer:
    """State of one run across steps. ``fit()`` returns the process exit code."""

    def __init__(self, cfg, *, rank: int, local_rank: int, world_size: int, device: str):
        from train.ds_config import build_ds_config
        from train.engine import build_engine
        from train.model import AttentionConfig, ModelConfig, build_model
        from train.schedule import schedule_from_config

        self.cfg, self.rank, self.world_size, self.device = cfg, rank, world_size, device
        self.run_dir = Path(cfg.run_dir)
        self.ckpt_root = self.run_dir / "checkpoints"
        self.model_dict, self.attn_dict = _to_plain(cfg.model), _to_plain(cfg.attention)
        self.model_cfg = ModelConfig.from_dict(self.model_dict)
        self.attn_cfg = AttentionConfig.from_dict(self.attn_dict)
        self.stage = int(cfg.deepspeed.stage)
        self.lr_at = schedule_from_config(cfg)
        self.stop = StopRequest().install()

        if cfg.train.deterministic:  # CPU runs are deterministic anyway; this pins cuBLAS/cuDNN choices
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.backends.cudnn.benchmark = False
            torch.use_deterministic_algorithms(True, warn_only=True)
        seed_everything(int(cfg.seed))
        self.data_dir = prepare_data(cfg, rank, self.log)
        self.loader = build_loader(cfg, self.data_dir, "train", rank, world_size, self.model_cfg.vocab_size)
        if self.loader.vocab_size > self.model_cfg.vocab_size:
            raise ValueError(f"data in {self.data_dir} has vocab_size {self.loader.vocab_size} > "
                             f"model.vocab_size {self.model_cfg.vocab_size} (tokenizer does not match the model)")
        self.tokenizer_file = self.loader.tokenizer_path

        model = build_model(self.model_cfg, self.attn_cfg)
        if cfg.train.init_from:  # a resumed run's checkpoint overwrites these weights below
            from train.model.pretrained import load_weights

            src = load_weights(model, cfg.train.init_from, self.model_cfg, self.attn_cfg)
            self.log(f"weights initialised from {src}")
            if cfg.train.get("init_redraw_unseen_embeddings"):
                unseen = torch.from_numpy(_source_token_counts(cfg.train.init_from, self.model_cfg.vocab_size) == 0)
                model.redraw_token_rows(unseen, torch.Generator().manual_seed(int(cfg.seed)))
                self.log(f"embedding rows of {int(unseen.sum())} of {unseen.numel()} token ids re-drawn: they never "
                         f"occur in the training data of {cfg.train.init_from}")
            if cfg.train.get("init_reset_gates"):
                branches = list(cfg.train.init_reset_gates)
                if model.reset_gates(branches):
                    self.log(f"NSA gates of {branches} restarted at attention.gate_init {dict(self.attn_cfg.gate_init)}")
        elif cfg.train.get("init_redraw_unseen_embeddings"):  # set by an experiment also run from scratch
            self.log("train.init_redraw_unseen_embeddings has no effect without train.init_from: every "
                     "embedding row is already a fresh draw")
        if cfg.train.activation_checkpointing:
            model.set_gradient_checkpointing(True)
        if device == "cuda":
            model = model.cuda()
        self.ds_config = build_ds_config(cfg, world_size)
        self.engine = build_engine(cfg, model, self.ds_config)
        self.params = [p for p in self.engine.module.parameters() if p.requires_grad]
        self.flops_per_token = self._flops_per_token()

        self.step, self.tokens_seen, self.skipped, self.consecutive_bad = 0, 0, 0, 0
        self.wandb_id = None
        self._resume()
        if rank == 0:
            self._write_run_info()
        self.metrics = self._metrics_logger()

    # ------------------------------------------------------------------ setup

    def log(self, msg: str) -> None:
        if self.rank == 0:
            logger = getattr(self, "metrics", None)
            (logger.message if logger is not None else lambda m: print(m, flush=True))(msg)

    def _flops_per_token(self) -> float | None:
        try:
            from train.model.flops import flops_per_token
        except ImportError:
            return None
        return float(flops_per_token(self.model_cfg, self.attn_cfg, int(self.cfg.train.seq_len), training=True)["total"])

    def _expected(self) -> dict:
        return {"model": self.model_dict, "attention": self.attn_dict, "world_size": self.world_size,
                "zero_stage": self.stage}

    def _resume(self) -> None:
        ckpt = checkpointer.choose(self.ckpt_root, str(self.cfg.resume), self.cfg.checkpoint.verify, self.rank,
                                   log=self.log)
        if ckpt is None:
            self.log(f"starting {self.cfg.run_name} from scratch in {self.run_dir}")
            return
        state = checkpointer.load(self.engine, ckpt, self.rank, self._expected())
        self.loader.load_state_dict(state["loader"])
        self.step, self.tokens_seen = int(state["step"]), int(state["tokens_seen"])
        self.skipped, self.consecutive_bad = int(state["skipped_steps"]), int(state["consecutive_nonfinite"])
        self.wandb_id = state.get("wandb_id")
        self.log(f"resumed from {ckpt} at step {self.step} ({self.tokens_seen} tokens seen)")

    def _write_run_info(self) -> None:
        """config.yaml, ds_config.json, git commit and package versions next to the run."""
        import importlib.metadata
        import subprocess

        from omegaconf import OmegaConf

        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "config.yaml").write_text(OmegaConf.to_yaml(self.cfg, resolve=True))
        (self.run_dir / "ds_config.json").write_text(json.dumps(self.ds_config, indent=2) + "\n")
        repo = Path(__file__).resolve().parents[1]
        try:
            commit = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True,
                                    timeout=10).stdout.strip()
            dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                                   capture_output=True, text=True, timeout=10).stdout.strip()
            commit = (commit or "unknown") + ("-dirty" if dirty else "")
        except (OSError, subprocess.SubprocessError):
            commit = "unknown"
        (self.run_dir / "git_commit.txt").write_text(commit + "\n")
        pkgs = sorted(f"{d.metadata['Name']}=={d.version}" for d in importlib.metadata.distributions()
                      if d.metadata["Name"])
        (self.run_dir / "pip_freeze.txt").write_text("\n".join(pkgs) + "\n")

    def _metrics_logger(self):
        from train.metrics import MetricsLogger

        c = self.cfg
        group = c.logging.wandb.group or c.name
        tags = [f"attn={self.attn_cfg.kind}", f"model={self.model_cfg.mlp}", *c.logging.wandb.tags]
        return MetricsLogger(self.run_dir, self.rank == 0, progress_bar=c.logging.progress_bar,
                             total_steps=int(c.train.max_steps), start_step=self.step, wandb_cfg=c.logging.wandb,
                             run_name=c.run_name, group=group, tags=tags, config=_to_plain(c),
                             wandb_id=self.wandb_id)

    # ------------------------------------------------------------------ steps

    def _micro_batch(self, batch: dict, step: int):
        """Forward + backward of one micro-batch; returns (lm loss tensor, target tokens, stats)."""
        dev = self.device
        labels = batch["labels"].to(dev)
        out = self.engine(batch["input_ids"].to(dev), position_ids=batch["position_ids"].to(dev),
                          cu_seqlens=batch["cu_seqlens"].to(dev), labels=labels)
        loss = out.loss
        if step in self.cfg.debug.nan_loss_at_steps:
            loss = loss * float("nan")
        if step in self.cfg.debug.nan_grad_at_steps:
            loss = _NanGrad.apply(loss)
        # A non-finite loss must give non-finite gradients, so the step is skipped downstream.
        # (A constant factor: torch.where would route 0 * NaN = NaN into the finite branch's grad.)
        factor = torch.where(torch.isfinite(loss.detach()), 1.0, float("nan")).to(loss.dtype)
        loss_bw = loss * factor
        self.engine.backward(loss_bw)
        return (loss - out.aux_loss).detach().float(), int((labels != -100).sum()), out.stats

    def _stage0_grad_norm(self) -> float:
        """fp32 ZeRO-0 has no overflow check: norm of the (all-reduced) grads; skip the update if
        non-finite. (bf16 ZeRO-0 runs DeepSpeed's bf16 optimizer wrapper, which checks itself.)"""
        norms = [p.grad.detach().float().norm() for p in self.params if p.grad is not None]
        gn = float(torch.stack(norms).norm()) if norms else 0.0
        if not math.isfinite(gn):
            for p in self.params:  # finite grads for DeepSpeed's clipping; the update itself is skipped
                if p.grad is not None:
                    p.grad.zero_()
            self.engine.optimizer.skip_next = True
        return gn

    def train_step(self, it) -> dict:
        """One optimizer step (grad_accum micro-batches); skipped when anything is non-finite."""
        from train.engine import set_lr

        step = self.step + 1
        lr = self.lr_at(self.step)
        set_lr(self.engine, lr)
        ga = int(self.cfg.train.grad_accum)
        loss_sum = torch.zeros((), dtype=torch.float64)
        tokens, stats, gn = 0, {}, None
        for micro in range(ga):
            loss, n_tok, stats = self._micro_batch(next(it), step)
            loss_sum += loss.cpu().double()
            tokens += n_tok
            if micro == ga - 1 and self.stage == 0 and self.cfg.train.precision == "fp32":
                gn = self._stage0_grad_norm()
            self.engine.step()
        if gn is None:
            g = self.engine.get_global_grad_norm()
            gn = float(g) if g is not None else float("nan")
        local_bad = 0.0 if torch.isfinite(loss_sum) else 1.0
        red = torch.tensor([float(loss_sum) if local_bad == 0 else 0.0, local_bad, float(tokens),
                            1.0 if self.stop.requested else 0.0], dtype=torch.float64)
        import torch.distributed as dist

        dist.all_reduce(red)
        bad = red[1] > 0 or not math.isfinite(gn)
        self.step = step
        self.tokens_seen += int(red[2])
        if bad:
            self.skipped += 1
            self.consecutive_bad += 1
        else:
            self.consecutive_bad = 0
            if hasattr(self.engine.module, "update_moe_bias"):
                self.engine.module.update_moe_bias()
        loss = float(red[0]) / (ga * self.world_size) if not bad else float("nan")
        return {"loss": loss, "grad_norm": gn, "lr": lr, "tokens": int(red[2]), "bad": bool(bad),
                "stop": bool(red[3] > 0), "stats": stats}

    @torch.no_grad()
    def validate(self) -> float:
        """Mean loss over the first ``val_batches`` batches of the validation split (same every time)."""
        import torch.distributed as dist

        loader = build_loader(self.cfg, self.data_dir, "validation", self.rank, self.world_size,
                              self.model_cfg.vocab_size, shuffle=False)
        self.engine.eval()
        total = torch.zeros(2, dtype=torch.float64)
        for i, batch in enumerate(loader):
            if i >= int(self.cfg.train.val_batches):
                break
            out = self.engine(batch["input_ids"].to(self.device), position_ids=batch["position_ids"].to(self.device),
                              cu_seqlens=batch["cu_seqlens"].to(self.device), labels=batch["labels"].to(self.device))
            total += torch.tensor([float(out.loss - out.aux_loss), 1.0], dtype=torch.float64)
        self.engine.train()
        dist.all_reduce(total)
        return float(total[0] / total[1].clamp_min(1))

    # ------------------------------------------------------------------ checkpoints

    def trainer_state(self) -> dict:
        return {"step": self.step, "tokens_seen": self.tokens_seen, "loader": self.loader.state_dict(),
                "skipped_steps": self.skipped, "consecutive_nonfinite": self.consecutive_bad,
                "wandb_id": self.metrics.wandb_id, "config_hash": config_hash(self.model_dict, self.attn_dict),
                "model_config": {"model": self.model_dict, "attention": self.attn_dict},
                "world_size": self.world_size, "zero_stage": self.stage, "run_name": str(self.cfg.run_name)}

    def save(self) -> bool:
        c = self.cfg.checkpoint
        ok = checkpointer.save(self.engine, self.ckpt_root, self.step, self.trainer_state(),
                               keep_last=int(c.keep_last), with_sha256=c.verify == "sha256", rank=self.rank,
                               log=self.log, kill_after_write=self.step == int(self.cfg.debug.kill_in_save_at_step))
        if not ok and c.on_save_error == "stop":
            raise SaveError(f"checkpoint at step {self.step} could not be written (checkpoint.on_save_error=stop)")
        return ok

    # ------------------------------------------------------------------ loop

    def _step_metrics(self, r: dict, dt: float) -> dict:
        from train.metrics import peak_flops

        tps = r["tokens"] / dt if dt > 0 else None
        peak = peak_flops(self.device, str(self.cfg.train.precision))
        mfu = (tps * self.flops_per_token / (peak * self.world_size)
               if tps and peak and self.flops_per_token else None)
        mem = torch.cuda.max_memory_allocated() / 2**30 if self.device == "cuda" else None
        st = r["stats"]
        return {"train/loss": r["loss"], "train/grad_norm": r["grad_norm"], "train/lr": r["lr"],
                "train/tokens": self.tokens_seen, "train/skipped_steps": self.skipped,
                "perf/tokens_per_sec": tps, "perf/mfu": mfu, "mem/max_allocated_gib": mem,
                "moe/aux_loss": st.get("moe/aux_loss"), "moe/load_cv": st.get("moe/load_cv"),
                "moe/max_load_ratio": st.get("moe/max_over_mean"),
                "nsa/gate_cmp": st.get("nsa/gate_cmp"), "nsa/gate_slc": st.get("nsa/gate_slc"),
                "nsa/gate_win": st.get("nsa/gate_win"), "nsa/select_kl": st.get("nsa/select_kl")}

    def fit(self) -> int:
        c = self.cfg
        max_steps, every = int(c.train.max_steps), int(c.checkpoint.every_steps)
        val_every, log_every = int(c.train.val_every), int(c.logging.log_every)
        it = iter(self.loader)
        self.engine.train()
        self._write_status("running")
        while self.step < max_steps:
            t0 = time.perf_counter()
            r = self.train_step(it)
            dt = time.perf_counter() - t0
            if r["bad"]:
                self.log(f"step {self.step}: non-finite loss or gradient, step skipped "
                         f"({self.consecutive_bad} in a row, {self.skipped} in total)")
                if self.consecutive_bad >= int(c.train.max_consecutive_nonfinite):
                    first = self.step - self.consecutive_bad + 1
                    raise NonFiniteError(f"{self.consecutive_bad} consecutive steps ({first}..{self.step}) had a "
                                         f"non-finite loss or gradient; stopping at step {self.step}")
            metrics = self._step_metrics(r, dt)
            if val_every and self.step % val_every == 0:
                metrics["val/loss"] = self.validate()
            if self.step % log_every == 0 or self.step == max_steps or "val/loss" in metrics:
                self.metrics.log(self.step, metrics)
            if r["stop"]:
                self.log(f"stop requested by signal at step {self.step}: saving a checkpoint and exiting")
                self.save()
                self._write_status("preempted")
                if self.stop.requested:
                    self.stop.chain()  # e.g. submitit's requeue, now that the checkpoint is safe
                return 0
            if (every and self.step % every == 0) or (self.step == max_steps and c.checkpoint.save_at_end):
                self.save()
        if c.checkpoint.export_at_end:
            from train.export import export

            out = export(self.engine, self.run_dir / "export", self.model_cfg, self.attn_cfg, self.tokenizer_file,
                         self.stage, self.rank)
            self.log(f"exported {out}")
        self._write_status("finished")
        self.log(f"done: {self.step} steps, {self.tokens_seen} tokens, {self.skipped} skipped")
        return 0

    def _write_status(self, state: str) -> None:
        """<run_dir>/status.json: "finished" or "preempted" (launch/slurm.sbatch requeues on the latter)."""
        if self.rank == 0:
            from train.checkpoint import write_text_atomic

            write_text_atomic(self.run_dir / "status.json",
                              json.dumps({"state": state, "step": self.step, "tokens_seen": self.tokens_seen}) + "\n")

    def close(self) -> None:
        self.stop.uninstall()
        if getattr(self, "metrics", None) is not None:
            self.metrics.close()


def run(cfg) -> int:
    """Validate, set up the process group, train; returns the exit code."""
    from train.engine import init_distributed, resolve_device, setup_env, teardown_distributed
    from train.validate import ConfigError, validate

    launch = setup_env()
    rank_env = int(os.environ["RANK"])
    device = resolve_device(str(cfg.device))
    try:
        validate(cfg, int(os.environ["WORLD_SIZE"]), device)
    except ConfigError as e:
        if rank_env == 0:
            print(f"error: {e}", flush=True)
        teardown_distributed(launch)
        return 2
    rank, local_rank, world_size = init_distributed(device)
    trainer = None
    code = 1
    try:
        trainer = Trainer(cfg, rank=rank, local_rank=local_rank, world_size=world_size, device=device)
        code = trainer.fit()
    except SaveError as e:
        code = _report(rank, e, 3)
    except NonFiniteError as e:
        code = _report(rank, e, 4)
    except CheckpointError as e:
        code = _report(rank, e, 5)
    except ValueError as e:  # bad input found while building the run (data, tokenizer, shards)
        code = _report(rank, e, 2)
    finally:
        if trainer is not None:
            trainer.close()
        teardown_distributed(launch)
    return code


def _report(rank: int, err: Exception, code: int) -> int:
    if rank == 0:
        print(f"error: {err}", flush=True)
    return code
