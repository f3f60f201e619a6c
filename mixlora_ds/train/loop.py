"""The training loop: DeepSpeed engine, global-token-normalised loss, checkpoints, signals, logging.

Loss of one optimizer step (G micro-batches on each of W ranks)::

    loss = sum over all answer tokens of CE / (answer tokens in the GLOBAL batch)
           + mean over the G*W forwards of the router aux loss

Each rank counts its tokens for the step first and one all-reduce gives the global count, so a
micro-batch with few answer tokens weighs exactly as much as its tokens, whatever rank it is on.
DeepSpeed divides gradients by G (in backward) and W (in its reduction); the micro-batch loss is
multiplied by G*W to undo that.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import time
from typing import Any

import numpy as np
import torch

from mixlora_ds import dist
from mixlora_ds.train.batches import (IGNORE, BatchStream, answer_token_count, model_inputs, real_token_mask,
                                      token_ce)
from mixlora_ds.train.checkpoint import CheckpointError, CheckpointManager
from mixlora_ds.train.compiled_layers import begin_step
from mixlora_ds.train.config import TrainConfig, dump_config
from mixlora_ds.train.ds_config import zero_stage
from mixlora_ds.train.gc_schedule import ScheduledGC
from mixlora_ds.train.metrics import Interval, all_reduce_sums, flop_per_token
from mixlora_ds.train.monitor import Monitor, peak_memory_gb
from mixlora_ds.train.plan import RunPlan
from mixlora_ds.train.run_dir import (METRICS, TRAIN_COMPLETE, TRAIN_STOPPED, RunStart, decide_start,
                                      truncate_metrics, write_run_record)
from mixlora_ds.train.signals import EXIT_RESUMABLE, StopRequest

log = logging.getLogger("mixlora_ds.train")


# ----------------------------------------------------------------------------------------- train
class Trainer:
    def __init__(self, plan: RunPlan, resume: str | None, overwrite: bool = False, watch_launcher: bool = False):
        self.plan = plan
        self.cfg: TrainConfig = plan.cfg
        self.resume_spec = resume if resume is not None else self.cfg.checkpoint.resume
        self.overwrite = overwrite
        self.watch_launcher = watch_launcher
        self.rank = dist.rank()
        self.world = dist.world_size()
        self.device = dist.device()
        self.stop = StopRequest()

    # ------------------------------------------------------------------------------------ set-up
    def setup(self) -> None:
        """Everything before the first step; collectives in the same order on every rank."""
        self.stop.install(watch_launcher=self.watch_launcher)
        self.start = self._decide_start()  # before the model is built: a refused start costs nothing
        self._build()
        self._seed_this_rank()
        self._open_training_data()
        self._size_statistics()
        self.ckpt = CheckpointManager(self.cfg.checkpoint_dir, self.cfg.checkpoint.keep_last, self.start.run_id)
        self.engine_stage = zero_stage(self.plan.engine_ds_config)  # decides the checkpoint's file layout
        self.run_config_yaml = dump_config(self.cfg)
        self.step = self._resume()
        self._prepare_output_dir()
        # TensorBoard drops what earlier writers of this run logged after the step it starts from.
        self.monitor = Monitor(self.cfg.tensorboard_dir, dist.is_main(), self.plan.total_steps,
                               self.cfg.logging.progress_bar, start_step=self.step, purge_step=self.step + 1)

    def _build(self) -> None:
        """The model, its DeepSpeed engine (with the lr schedule) and, under expert parallelism, the
        optimizer of this rank's experts."""
        from mixlora_ds.train.build import build_model, start_engine
        from mixlora_ds.train.schedule import build_scheduler

        plan, schedule = self.plan, self.cfg.schedule
        self.built = build_model(plan)
        self._log_model()

        def scheduler(optimizer):
            return build_scheduler(optimizer, schedule.type, plan.warmup_steps, plan.total_steps,
                                   schedule.min_lr_ratio)

        self.engine = start_engine(self.built, plan.engine_ds_config, scheduler)
        self.model = self.engine.module
        self.experts = self._expert_optimizer(self.built)

    def _log_model(self) -> None:
        from mixlora_ds.train.build import count_parameters

        plan, sharded = self.plan, self.built.sharded_base
        total, trainable = count_parameters(self.built.model)
        log.info("model: %s parameters, %s trainable (%.3f%%), ZeRO stage %d, %s, world %d, grad accum %d",
                 f"{total:,}", f"{trainable:,}", 100.0 * trainable / max(total, 1), plan.stage, plan.precision,
                 self.world, plan.grad_accum)
        if sharded is not None:
            held, full = sharded.held_numel()
            how = "copy engine" if sharded.transport == "copy_engine" else "all-gather"
            log.info("ZeRO-3 by mixlora_ds: frozen base sharded per decoder layer, this rank's shards hold %s "
                     "of %s elements, gathered by %s; DeepSpeed runs stage 2 for the adapter",
                     f"{held:,}", f"{full:,}", how)

    def _seed_this_rank(self) -> None:
        # Dropout masks differ between ranks (like different GPUs would); resume restores them.
        seed = self.cfg.seed * 1000 + self.rank
        torch.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed % 2**32)

    def _open_training_data(self) -> None:
        """This rank's stream of micro-batches, and how they are fed to the model."""
        cfg = self.cfg
        self.dense_mask = not cfg.model.attn_implementation.startswith("flash")
        self.compute_dtype = torch.bfloat16 if self.plan.precision == "bf16" else torch.float32
        self.train_stream = BatchStream(cfg.data.train_dir, cfg.data.train_split, cfg.batch.micro_batch_size,
                                        cfg.seed, cfg.data.shuffle, cfg.data.drop_last, self.rank, self.world,
                                        self.dense_mask)
        # Every rank must run the same number of forwards (ZeRO-3 gathers are collectives).
        n = torch.tensor([self.train_stream.micro_batches_per_epoch()] * 2, dtype=torch.long)
        lo = dist.all_reduce_(n[:1].clone(), "min").item()
        hi = dist.all_reduce_(n[1:].clone(), "max").item()
        if lo != hi:
            raise RuntimeError(f"ranks see different numbers of micro-batches per epoch ({lo}..{hi}); "
                               f"the sampler must give every rank the same count")

    def _size_statistics(self) -> None:
        """What an interval's statistics hold (tasks, layers x experts), and the FLOPs behind MFU."""
        plan, adapter = self.plan, self.cfg.adapter
        self.task_names = plan.task_names
        self.is_moe = adapter.is_mixlora
        n_layers = getattr(plan.hf_config, "num_hidden_layers", 0) if self.is_moe else 0
        n_experts = adapter.num_experts if self.is_moe else 0
        self.interval_shape = (len(self.task_names), n_layers, n_experts)
        self.flops_per_token = flop_per_token(self.model, plan.hf_config, plan.seq_len)

    def _resume(self) -> int:
        """Load the checkpoint this start continues from, if any; the step training goes on from."""
        info = self.start.resume
        if info is None:
            if self.resume_spec == "auto":
                log.info("--resume auto: no complete checkpoint under %s, starting fresh", self.cfg.checkpoint_dir)
            return 0
        self._check_saved_expert_parallel(info)
        state = self.ckpt.load(self.engine, info, self.engine_stage)
        if self.experts is not None:
            from mixlora_ds.train.expert_checkpoint import load_experts

            load_experts(info.path, self.built.expert_parallel, self.experts)
        self.train_stream.load_state_dict(state["data"])
        log.info("resumed from %s at step %d", info.path, state["step"])
        return state["step"]

    def _prepare_output_dir(self) -> None:
        """Rank 0: this run's record, the end markers of an earlier start removed, metrics cut back to
        the step this one starts from, and the resolved configs written."""
        out = self.cfg.output_dir
        self.complete_marker = os.path.join(out, TRAIN_COMPLETE)
        self.stopped_marker = os.path.join(out, TRAIN_STOPPED)
        self.metrics_path = os.path.join(out, METRICS)
        if not dist.is_main():
            return
        os.makedirs(out, exist_ok=True)
        for marker in (self.complete_marker, self.stopped_marker):
            if os.path.exists(marker):
                os.remove(marker)
        write_run_record(out, self.start.run_id, self.cfg.run_name)
        dropped = truncate_metrics(self.metrics_path, self.step)
        if dropped:
            log.info("%s: dropped %d rows logged after step %d (the run continues from there)",
                     self.metrics_path, dropped, self.step)
        self._write_resolved_configs()

    def _write_resolved_configs(self) -> None:
        """The resolved run and DeepSpeed configs go to files; the log names them and shows the values
        people look for."""
        from mixlora_ds.utils.atomic import atomic_write_text

        plan = self.plan
        files = {"run_config.yaml": self.run_config_yaml, "ds_config.json": json.dumps(plan.ds_config, indent=2) + "\n"}
        if plan.shards_base:
            files["ds_engine_config.json"] = json.dumps(plan.engine_ds_config, indent=2) + "\n"
        paths = [os.path.join(self.cfg.output_dir, name) for name in files]
        for path, text in zip(paths, files.values()):
            atomic_write_text(path, text)
        log.info("resolved configs: %s", ", ".join(paths))
        log.info("run: %s", plan.summary())

    def _decide_start(self) -> RunStart:
        """Rank 0 decides which run this is and where it starts; every rank gets the same answer."""
        start, error = None, None
        if dist.is_main():
            try:
                start = decide_start(self.cfg, self.resume_spec, self.overwrite)
            except CheckpointError as e:
                error = str(e)
            except OSError as e:
                error = f"{self.cfg.output_dir}: {e}"
        start, error = dist.broadcast_object((start, error))
        if error:
            raise CheckpointError(error, True)
        if dist.is_main():
            for warning in start.warnings:
                log.warning("%s", warning)
        return start

    def _expert_optimizer(self, built):
        """Under expert parallelism, the optimizer of this rank's experts (linked to the engine)."""
        if built.expert_parallel is None:
            return None
        from mixlora_ds.parallel.ep_cost import describe_for_run
        from mixlora_ds.parallel.expert_optimizer import ExpertOptimizer

        o = self.cfg.optim
        experts = ExpertOptimizer(built.expert_params, built.expert_parallel, o.lr, tuple(o.betas), o.eps,
                                  o.weight_decay, o.max_grad_norm)
        experts.attach(self.engine)
        if dist.is_main():
            for line in describe_for_run(self.plan, built.expert_parallel).splitlines():
                log.info(line)
        return experts

    def _check_saved_expert_parallel(self, info) -> None:
        """Experts saved by EP ranks live in expert shards, without EP inside DeepSpeed's files:
        the two do not convert into each other (EP sizes above 1 do, by resharding)."""
        saved = int(info.meta.get("expert_parallel_size", 1))
        now = self.cfg.parallel.expert_parallel_size
        if (saved > 1) != (now > 1):
            from mixlora_ds.train.checkpoint import CheckpointError

            raise CheckpointError(
                f"{info.path}: saved with parallel.expert_parallel_size={saved}, this run has {now}; a checkpoint "
                f"with expert parallelism resumes with any size above 1 (its experts are resharded), one without "
                f"it only without it")

    # ------------------------------------------------------------------------------------ a step
    def train_step(self, iv: Interval) -> bool:
        """One optimizer step; False (and nothing trained) when a rank was asked to stop."""
        engine, plan = self.engine, self.plan
        self.data_state = self.train_stream.state_dict()  # what a stop before this step saves
        batches = [self.train_stream.next() for _ in range(plan.grad_accum)]
        # One all-reduce per step carries the answer-token count and any rank's stop request (a
        # signal may reach ranks at different times; all must stop at the same step).
        local = torch.tensor([float(sum(answer_token_count(b) for b in batches)), *self.stop.votes()],
                             dtype=torch.float64, device=self.device)
        dist.all_reduce_(local)
        votes = local[1:].tolist()
        if any(votes):
            self.stop.adopt(votes)
            return False
        global_tokens = local[0]
        scale = self.world * plan.grad_accum / global_tokens.clamp_min(1.0)
        lr = engine.get_lr()[0]
        ce_sum = aux_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        for batch in batches:
            inputs = model_inputs(batch, self.cfg.model.attn_implementation, self.device, self.compute_dtype)
            self._begin_forward()
            logits = engine(**inputs).logits
            labels = batch["labels"].to(self.device)
            ce_BS = token_ce(logits, labels)
            real_BS = real_token_mask(batch, self.device)
            aux = self._aux_loss(real_BS)
            loss = ce_BS.sum() * scale.to(ce_BS.dtype) + aux
            engine.backward(loss)
            boundary = engine.is_gradient_accumulation_boundary()
            if self.experts is not None and boundary:
                self.experts.reduce_gradients()  # before the engine's step: its norm includes them
            engine.step()
            if self.experts is not None and boundary:
                self.experts.step(lr)
            ce_sum = ce_sum + ce_BS.detach().sum().double()
            aux_sum = aux_sum + aux.detach().double()
            self._accumulate_stats(iv, batch, ce_BS.detach(), real_BS)
        self.step += 1
        iv.steps.append(self.step)
        iv.ce.append(ce_sum)
        iv.aux.append(aux_sum)
        iv.tokens.append(global_tokens)
        iv.lr.append(lr)
        iv.grad_norm.append(engine.get_global_grad_norm())
        return True

    def _begin_forward(self) -> None:
        if self.cfg.model.cuda_graphs:
            begin_step()  # this forward's replays may overwrite the last one's outputs (all read by now)

    def _aux_loss(self, real_BS: torch.Tensor) -> torch.Tensor:
        if not self.is_moe:
            return torch.zeros((), device=self.device)
        from mixlora_ds.model.aux_loss import mixlora_aux_loss

        return mixlora_aux_loss(self.model, attention_mask=real_BS)

    def _accumulate_stats(self, iv: Interval, batch: dict[str, Any], ce_BS: torch.Tensor,
                          real_BS: torch.Tensor) -> None:
        iv.real_tokens += real_BS.sum()
        iv.positions += real_BS.numel()
        targets = batch["labels"][:, 1:].to(self.device)
        task = batch["task_ids"][:, 1:].to(self.device)
        valid = (targets != IGNORE) & (task >= 0) & (task < iv.n_tasks)
        t = task[valid]
        iv.task_ce.index_add_(0, t, ce_BS[valid].double())
        iv.task_tokens.index_add_(0, t, torch.ones_like(t, dtype=torch.float64))
        if self.is_moe:
            from mixlora_ds.model.stats import routing_statistics

            s = routing_statistics(self.model, attention_mask=real_BS)
            iv.counts_LE += s.counts_LE.double()
            iv.entropy_L += s.entropy_L.double() * s.tokens
            iv.routed_tokens += s.tokens
            iv.dropped_L += s.dropped_L.double()

    # ----------------------------------------------------------------------------------- logging
    def flush_interval(self, iv: Interval) -> None:
        """One all-reduce of every local statistic, then rank 0 writes scalars, metric rows and the
        console line."""
        if not iv.steps:
            return
        sums = all_reduce_sums(iv.local_sums())
        _raise_if_diverged(sums["ce"], iv)
        ep_scalars = self._expert_parallel_scalars(len(iv.steps), max(time.time() - iv.t0, 1e-9))
        if not dist.is_main():
            return
        rows = self._step_rows(iv, sums)
        scalars = self._interval_scalars(iv, sums, rows, ep_scalars)
        self.monitor.scalars(self.step, scalars)
        if self.is_moe and iv.n_layers:
            self._routing_scalars(iv, sums)
        self.monitor.flush()
        with open(self.metrics_path, "a", encoding="utf-8") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)
        grad_norm = np.nanmean([row["grad_norm"] for row in rows])
        self.monitor.line(
            f"step {self.step}/{self.plan.total_steps} | loss {scalars['train/loss']:.4f} "
            f"ce {scalars['train/ce_loss']:.4f} aux {scalars['train/aux_loss']:.5f} | lr {scalars['train/lr']:.2e} | "
            f"gnorm {grad_norm:.3f} | {scalars['perf/tokens_per_s']:,.0f} tok/s | "
            f"{scalars['perf/tflops']:.3f} TFLOP/s/dev | mem {scalars['perf/peak_mem_gb']:.2f} GB"
        )

    def _step_rows(self, iv: Interval, sums: dict[str, Any]) -> list[dict[str, float]]:
        """metrics.jsonl's rows for the interval's steps: CE per answer token of the global batch, aux
        loss per forward, their sum, lr, global gradient norm and answer tokens."""
        forwards = self.world * self.plan.grad_accum
        rows = []
        for step, ce_sum, aux_sum, tokens, lr, grad_norm in zip(iv.steps, sums["ce"], sums["aux"], iv.tokens,
                                                                iv.lr, _grad_norms(iv)):
            tokens = float(tokens)
            ce, aux = ce_sum / max(tokens, 1.0), aux_sum / forwards
            rows.append({"step": step, "loss": ce + aux, "ce_loss": ce, "aux_loss": aux, "lr": lr,
                         "grad_norm": grad_norm, "tokens": tokens})
        return rows

    def _interval_scalars(self, iv: Interval, sums: dict[str, Any], rows: list[dict[str, float]],
                          ep_scalars: dict[str, float]) -> dict[str, float | None]:
        """The interval's TensorBoard scalars: step means, throughput, memory, expert parallelism, MFU,
        per-task losses."""
        elapsed = max(time.time() - iv.t0, 1e-9)
        tps = sums["real_tokens"] / elapsed
        tflops = self.flops_per_token * sums["positions"] / elapsed / self.world / 1e12
        grad_norm = [row["grad_norm"] for row in rows]
        scalars = {
            "train/loss": float(np.mean([row["loss"] for row in rows])),
            "train/ce_loss": float(np.mean([row["ce_loss"] for row in rows])),
            "train/aux_loss": float(np.mean([row["aux_loss"] for row in rows])), "train/lr": iv.lr[-1],
            "train/grad_norm": float(np.nanmean(grad_norm)) if not all(map(math.isnan, grad_norm)) else None,
            "perf/tokens_per_s": tps, "perf/tokens_per_s_per_device": tps / self.world, "perf/tflops": tflops,
            "perf/peak_mem_gb": peak_memory_gb(),
        }
        scalars.update(ep_scalars)
        if self.cfg.logging.peak_tflops:
            scalars["perf/mfu"] = tflops / self.cfg.logging.peak_tflops
        for name, task_ce, task_tokens in zip(self.task_names, sums["task_ce"], sums["task_tokens"]):
            if task_tokens > 0:
                scalars[f"train/task_loss/{name}"] = task_ce / task_tokens
        return scalars

    def _routing_scalars(self, iv: Interval, sums: dict[str, Any]) -> None:
        """Per layer: expert load, router entropy and (switch routing) tokens dropped; the load heatmap
        when the interval holds one of its steps."""
        counts_LE = sums["counts_LE"]
        load_LE = counts_LE / np.maximum(counts_LE.sum(-1, keepdims=True), 1.0)
        entropy_L = sums["entropy_L"] / max(sums["routed_tokens"], 1.0)
        switch = self.cfg.adapter.routing_strategy == "mixlora-switch"
        every = self.cfg.logging.heatmap_every_steps
        heat = every > 0 and any(s % every == 0 for s in iv.steps)
        self.monitor.moe(self.step, load_LE, entropy_L, sums["dropped_L"] if switch else None, heat)

    def _expert_parallel_scalars(self, steps: int, elapsed: float) -> dict[str, float]:
        """Collective under expert parallelism: per interval step, rows received by each EP rank (over
        its replicas), their imbalance per layer (max / mean over EP ranks), bytes sent per rank, and
        the share of wall time in all-to-all exchanges. Empty without EP and on ranks other than 0."""
        if self.experts is None:
            return {}
        ep = self.built.expert_parallel
        stats = ep.stats
        L, P = len(stats.received), ep.layout.ep_size
        local = torch.tensor(stats.received + [stats.sent_bytes, stats.exchange_seconds()], dtype=torch.float64)
        stats.reset()
        every = [torch.zeros_like(local) for _ in range(self.world)]
        torch.distributed.all_gather(every, local)
        if not dist.is_main():
            return {}
        table = torch.stack(every)  # [world, L + 2]
        received_PL = table[:, :L].view(self.world // P, P, L).sum(0)
        imbalance_L = received_PL.max(0).values / received_PL.mean(0).clamp_min(1e-9)
        out = {f"ep/tokens_received/ep_rank_{p}": float(received_PL[p].sum()) / steps for p in range(P)}
        out.update({f"ep/received_imbalance/layer_{i}": float(x) for i, x in enumerate(imbalance_L)})
        out["ep/received_imbalance_max"] = float(imbalance_L.max())
        out["ep/bytes_sent_per_step"] = float(table[:, L].mean()) / steps
        out["ep/all_to_all_time_share"] = float(table[:, L + 1].mean()) / elapsed
        return out

    def write_scalar(self, tag: str, value: float) -> None:
        if dist.is_main():
            self.monitor.scalars(self.step, {tag: value})
            with open(self.metrics_path, "a", encoding="utf-8") as f:
                f.write(json.dumps({"step": self.step, tag: value}) + "\n")
            self.monitor.flush()

    # -------------------------------------------------------------------------------------- eval
    @torch.no_grad()
    def evaluate(self) -> float | None:
        """CE per answer token over the held-out split, every row counted once whatever the world size.

        Ranks may hold one row more than others; under ZeRO-3 every rank must still run the same
        number of forwards, so a rank out of rows repeats its last batch with weight zero.
        """
        if self.plan.eval_dir is None:
            return None
        from mixlora_ds.data.reader import PackedDataset, ResumableDistributedSampler, collate_packed

        ds = PackedDataset(self.plan.eval_dir, split=self.cfg.data.eval_split)
        sampler = ResumableDistributedSampler(ds, rank=self.rank, world_size=self.world, seed=self.cfg.seed,
                                              shuffle=False, drop_last=False)
        rows = list(iter(sampler))
        micro = self.cfg.batch.micro_batch_size
        chunks = [rows[i:i + micro] for i in range(0, len(rows), micro)]
        if self.cfg.eval.max_batches is not None:
            chunks = chunks[: self.cfg.eval.max_batches]
        n = int(dist.all_reduce_(torch.tensor([len(chunks)], device=self.device), "max").item())
        if n == 0:
            log.warning("no held-out rows: no eval loss")
            return None
        self.engine.eval()
        sums = torch.zeros(2, dtype=torch.float64, device=self.device)
        try:
            for i in range(n):
                real = i < len(chunks)
                rows_i = chunks[i] if real else (chunks[-1] if chunks else [0])
                batch = collate_packed([ds[j] for j in rows_i], attention_mask=self.dense_mask)
                inputs = model_inputs(batch, self.cfg.model.attn_implementation, self.device, self.compute_dtype)
                self._begin_forward()
                ce = token_ce(self.engine(**inputs).logits, batch["labels"].to(self.device))
                if real:
                    sums[0] += ce.sum().double()
                    sums[1] += answer_token_count(batch)
        finally:
            self.engine.train()
        dist.all_reduce_(sums)
        value = float(sums[0] / sums[1].clamp_min(1))
        self.write_scalar("eval/loss", value)
        if dist.is_main():
            self.monitor.line(f"step {self.step} | eval loss {value:.4f} over {int(sums[1])} answer tokens")
        return value

    # ------------------------------------------------------------------------------ save / export
    def save(self, reason: str, data_state: dict[str, Any] | None = None) -> None:
        t = time.time()
        data_state = data_state if data_state is not None else self.train_stream.state_dict()
        meta = {"reason": reason, "engine_stage": self.engine_stage,
                "expert_parallel_size": self.cfg.parallel.expert_parallel_size}
        if self.experts is None:
            path = self.ckpt.save(self.engine, self.step, {"data": data_state}, self.run_config_yaml,
                                  self.plan.ds_config, meta)
        else:
            from mixlora_ds.train.expert_checkpoint import hidden_from_engine_checkpoint, save_experts

            with hidden_from_engine_checkpoint(self.experts.params):
                path = self.ckpt.save(self.engine, self.step, {"data": data_state}, self.run_config_yaml,
                                      self.plan.ds_config, meta,
                                      lambda p: save_experts(p, self.built.expert_parallel, self.experts))
        log.info("checkpoint %s (%s) in %.1fs", path, reason, time.time() - t)

    def export(self) -> None:
        from mixlora_ds.train.export import export_adapter

        result = export_adapter(self.model, self.model.mixlora_config, self.plan.hf_config, self.cfg.export_dir,
                                self.built.expert_parallel)
        if dist.is_main():
            self.monitor.line(f"adapter exported to {self.cfg.export_dir}: {result['tensors']} tensors, "
                              f"{result['parameters']:,} parameters (verified)")

    # -------------------------------------------------------------------------------------- run
    def run(self) -> int:
        cfg, plan = self.cfg, self.plan
        self.engine.train()
        iv = Interval(*self.interval_shape, self.device)
        stopped = False
        last_saved = self.step if self.step > 0 else -1
        collector = ScheduledGC(cfg.gc_every_steps)
        try:
            while self.step < plan.total_steps:
                if not self.train_step(iv):
                    stopped = True
                    break
                self.monitor.advance(1)
                collector.step(self.step)
                if self.step % cfg.logging.every_steps == 0:
                    self.flush_interval(iv)
                    iv = Interval(*self.interval_shape, self.device)
                if cfg.eval.every_steps and self.step % cfg.eval.every_steps == 0:
                    self.evaluate()
                if cfg.checkpoint.every_steps and self.step % cfg.checkpoint.every_steps == 0:
                    # Metrics up to a checkpoint are on disk before it (and checked finite): a run
                    # resumed from it logs on from there without a gap.
                    self.flush_interval(iv)
                    iv = Interval(*self.interval_shape, self.device)
                    self.save("periodic")
                    last_saved = self.step
        finally:
            collector.close()
        self.flush_interval(iv)
        if stopped:
            if dist.is_main():
                self.monitor.line(f"{self.stop.cause}: saving at step {self.step} and exiting "
                                  f"with status {EXIT_RESUMABLE} (resume with --resume auto)")
            if last_saved != self.step:
                self.save(self.stop.reason or "stop", self.data_state)
            if dist.is_main():
                from mixlora_ds.utils.atomic import atomic_write_text

                # Tells a job script that this run stopped with a checkpoint saved, whatever exit status
                # its launcher ends up reporting (srun --kill-on-bad-exit may kill a rank exiting after).
                atomic_write_text(self.stopped_marker, json.dumps({"step": self.step, "reason": self.stop.reason,
                                                                   "exit": EXIT_RESUMABLE}) + "\n")
            self.monitor.close()
            return EXIT_RESUMABLE
        if cfg.eval.at_end and not (cfg.eval.every_steps and self.step % cfg.eval.every_steps == 0):
            self.evaluate()
        if cfg.checkpoint.save_final and last_saved != self.step:
            self.save("final")
        self.export()
        if dist.is_main():
            from mixlora_ds.utils.atomic import atomic_write_text

            # Tells a requeueing job script that there is nothing left to resume.
            atomic_write_text(self.complete_marker, json.dumps({"step": self.step, "adapter": self.cfg.export_dir}) + "\n")
        self.monitor.close()
        return 0


def train(plan: RunPlan, resume: str | None = None, overwrite: bool = False, watch_launcher: bool = False) -> int:
    """Run training; returns the exit status (0 finished, ``EXIT_RESUMABLE`` stopped with a checkpoint)."""
    trainer = Trainer(plan, resume, overwrite, watch_launcher)
    trainer.setup()
    return trainer.run()


def _grad_norms(iv: Interval) -> list[float]:
    """The interval's global gradient norms (the same on every rank); NaN where none was computed."""
    return [float(g) if g is not None else float("nan") for g in iv.grad_norm]


def _raise_if_diverged(losses: np.ndarray, iv: Interval) -> None:
    # The shipped ZeRO-2 bf16 config skips DeepSpeed's per-tensor overflow check (it costs a fifth of a
    # step), and with it DeepSpeed's skipping of a step whose gradient norm is NaN/inf. A diverged run is
    # stopped here instead, on every rank alike (losses are all-reduced, norms global), before anything
    # is saved: a non-finite loss, or a non-finite gradient norm (already applied, so not to be saved).
    norms = [float(g) for g in iv.grad_norm if g is not None]  # None: clipping off, no norm computed
    if not (np.isfinite(losses).all() and np.isfinite(norms).all()):
        raise FloatingPointError(f"non-finite training loss or gradient norm within steps {iv.steps[0]}-"
                                 f"{iv.steps[-1]}; lower the learning rate or resume from an earlier checkpoint")
