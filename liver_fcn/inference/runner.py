"""Running the cases: one failing case is a line in the summary, the others are kept; the run's summary."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
from monai.data import Dataset, decollate_batch
from monai.transforms import apply_transform

from liver_fcn.errors import InputError, root_cause
from liver_fcn.inference.outputs import CommitCased, leftover_stages
from liver_fcn.inference.report import summary_rows
from liver_fcn.networks.precision import Precision
from liver_fcn.outputs import write_csv_atomic, write_json_atomic

__all__ = ["CaseDataset", "CaseRunner", "finish", "init_distributed"]


logger = logging.getLogger("liver_fcn.inference")


def _one_line(e: BaseException) -> str:
    """The root cause of ``e`` in one line (MONAI wraps a transform's error in 'applying transform ...')."""
    e = root_cause(e)
    text = " ".join(str(e).split())
    return text if isinstance(e, InputError) else f"{type(e).__name__}: {text}"


class CaseDataset(Dataset):
    """MONAI ``Dataset`` of inference cases whose failures are data, not crashes.

    A case whose preprocessing raises (a slice that cannot be decoded after the up-front checks
    passed, say) comes out as ``{"case", "source_path", "error"}`` with a one-line message, so the
    engine goes on with the other cases and :class:`CaseRunner` names it in the summary.
    """

    def _transform(self, index: int):
        try:
            return super()._transform(index)
        except Exception as e:  # noqa: BLE001 - every failure becomes the case's error line
            item = self.data[index]
            return {
                "case": item.get("case", str(index)),
                "source_path": str(item.get("image", "")),
                "error": _one_line(e),
            }


class CaseRunner:
    """The evaluator's iteration for inference: network and post-processing (which writes the case's
    files) per case, a failing case recorded in :attr:`failed` instead of ending the run.

    Use as ``SupervisedEvaluator(iteration_update=CaseRunner(postprocessing), postprocessing=None)``:
    the post-processing runs inside the iteration so that its failure is caught with the case's name.
    With ``writer`` (the run's :class:`CommitCased`), a failed case's outputs of an earlier run in the
    output folder are named in its line and in the summary (``earlier_outputs_kept``): they stay, a
    whole set whose report says which model made it and when, and nothing of this run replaces them.
    """

    def __init__(self, postprocessing, writer: CommitCased | None = None) -> None:
        self.postprocessing = postprocessing
        self.writer = writer
        self.failed: list[dict] = []

    def __call__(self, engine, batch: dict):
        cases = [str(c) for c in batch.get("case", ["?"])]
        sources = [str(c) for c in batch.get("source_path", [""] * len(cases))]
        if "error" in batch:
            for case, source, error in zip(cases, sources, batch["error"]):
                self._fail(case, source, error)
            return []
        try:
            engine.state.batch = batch
            output = type(engine)._iteration(engine, engine, batch)  # the evaluator's own iteration
            # a decollating evaluator (MONAI's default) has split batch and output into items already
            batches = (
                engine.state.batch if isinstance(engine.state.batch, list) else decollate_batch(batch, detach=True)
            )
            outputs = output if isinstance(output, list) else decollate_batch(output, detach=True)
            return [apply_transform(self.postprocessing, {**b, **o}) for b, o in zip(batches, outputs)]
        except Exception as e:  # noqa: BLE001
            for case, source in zip(cases, sources):
                self._fail(case, source, _one_line(e))
            return []

    def _fail(self, case: str, source: str, error: str) -> None:
        kept = self.writer.earlier_outputs(case) if self.writer is not None else []
        earlier = f" (an earlier run's outputs of it stay: {', '.join(kept)})" if kept else ""
        logger.error(f"{case}: FAILED, nothing new written for it{earlier}: {error}")
        self.failed.append({"case": case, "input": source, "error": error, "earlier_outputs_kept": kept})


def case_of(row: dict) -> str:
    return str(row["case"])


def finish(
    writer: CommitCased,
    output_dir: str | os.PathLike,
    runner: CaseRunner | None = None,
    network: torch.nn.Module | None = None,
    engine=None,
) -> int:
    """End of an inference run: one summary for all processes (gathered under torchrun), written by
    the first as ``summary.json`` and ``summary.csv`` (a row per written case: volumes, HU, extent, QC,
    model) and printed; exit status 1 when a case failed. Returns the number
    of cases written by all processes."""
    mine = {
        "written": [
            {"case": r["case"], "input": r.get("input", ""), "files": r.get("files", {}), "written_by": r["written_by"]}
            for r in writer.written
        ],
        "rows": summary_rows(writer.written),
        "failed": list(runner.failed) if runner is not None else [],
        "seconds": float(engine.state.times.get("COMPLETED") or 0.0)
        if engine is not None and getattr(engine.state, "times", None)
        else 0.0,
        "network_seconds": float(network.seconds) if isinstance(network, Precision) else 0.0,
        "precision": network.precision if isinstance(network, Precision) else "",
        "device": str(next(iter(network.parameters())).device) if network is not None else "",
    }
    parts = [mine]
    distributed = dist.is_available() and dist.is_initialized()
    if distributed:
        parts = [None] * dist.get_world_size()
        dist.all_gather_object(parts, mine)
    written = [w for p in parts for w in p["written"]]
    failed = [f for p in parts for f in p["failed"]]
    rank0 = not distributed or dist.get_rank() == 0
    if rank0:
        summary = {
            "cases": len(written) + len(failed),
            "written": sorted(written, key=lambda w: w["case"]),
            "failed": sorted(failed, key=lambda f: f["case"]),
            "processes": [
                {k: p[k] for k in ("seconds", "network_seconds", "precision", "device")} | {"cases": len(p["written"])}
                for p in parts
            ],
        }
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        for stage in leftover_stages(output_dir):  # what failed cases or killed runs had staged
            shutil.rmtree(stage, ignore_errors=True)
        write_json_atomic(Path(output_dir) / "summary.json", summary)
        write_csv_atomic(Path(output_dir) / "summary.csv", sorted((r for p in parts for r in p["rows"]), key=case_of))
        seconds = max(p["seconds"] for p in parts)
        network_seconds = sum(p["network_seconds"] for p in parts)
        timing = f"{seconds:.1f} s, network {network_seconds:.1f} s, {mine['precision']}"
        n = len(written)
        logger.info(
            f"{n} case{'s' if n != 1 else ''} written to {output_dir} ({timing}"
            + (f", {len(parts)} processes" if distributed else "")
            + ")"
        )
        if failed:
            logger.error(  # each error was logged once, when its case failed
                f"{len(failed)} case{'s' if len(failed) != 1 else ''} FAILED: "
                + ", ".join(f["case"] for f in failed)
                + f" (the errors are above and in {Path(output_dir) / 'summary.json'})"
            )
    if distributed:
        dist.barrier()
        dist.destroy_process_group()
    if failed:
        raise SystemExit(1)
    return len(written)


def init_distributed() -> bool:
    """Join the process group when started by ``torchrun`` with more than one process (gloo: the
    processes only exchange their summaries; each rank runs its network on its own device).
    Returns whether this run is distributed."""
    if int(os.environ.get("WORLD_SIZE", 1)) <= 1 or not dist.is_available():
        return False
    if not dist.is_initialized():
        dist.init_process_group(backend="gloo")
    return True
