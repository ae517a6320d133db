"""Run passes in order, timing each, verifying each, and rolling back the ones that break.

Verification is part of the pipeline, not an afterthought: after a lossless pass the model
is run on the probe feeds and compared with the model before that pass; a pass that changes
outputs beyond float tolerance, crashes, or leaves a graph onnx.checker or onnxruntime
rejects is undone and reported. The final model is always compared with the original.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir

from onnxsqueeze.core.errors import RuntimeSessionError, VerificationError
from onnxsqueeze.core.external_data import iter_tensor_protos
from onnxsqueeze.core.io import (
    has_external_tensors,
    initializer_bytes,
    serialize,
    stored_bytes,
    weightless,
)
from onnxsqueeze.core.pass_base import SqueezePass, SqueezeResult
from onnxsqueeze.core.scratch import scratch_dir
from onnxsqueeze.core.stats import model_stats
from onnxsqueeze.pipeline.report import PassRecord, Report
from onnxsqueeze.run.compare import LOSSLESS_RTOL, Comparison, compare_runs
from onnxsqueeze.run.session import Session, crashes_onnxruntime

logger = logging.getLogger(__name__)

#: A reassociating pass may also move an output by this many times what onnxruntime's own
#: default optimizer moves it on the same feeds: two float evaluations of one function
#: differ from a third by up to a few times the same amount.
NOISE_FACTOR = 4.0


@dataclasses.dataclass(frozen=True)
class VerifyOptions:
    """How the pipeline checks its work."""

    enabled: bool = True
    rtol: float = LOSSLESS_RTOL
    providers: tuple[str, ...] = ("cpu",)
    check_structure: bool = True
    #: Verify with onnx.reference when onnxruntime cannot load the original model.
    reference_fallback: bool = True
    #: Verify consecutive lossless passes with one run, redoing them one by one on failure.
    group_lossless: bool = True


class Pipeline:
    """An ordered list of passes plus the verification that guards them."""

    def __init__(
        self,
        passes: Sequence[SqueezePass],
        *,
        verify: VerifyOptions | None = None,
        feeds: Sequence[dict[str, Any]] | None = None,
        retry_feeds: Iterable[tuple[str, list[dict[str, Any]]]] = (),
    ) -> None:
        """``retry_feeds``: (description, feeds) to try, lazily and in order, when the
        original model rejects ``feeds`` (generated probes whose guessed sizes it refuses)."""
        self.passes = list(passes)
        self.verify = verify or VerifyOptions()
        self.feeds = list(feeds or [])
        self._retry_feeds = retry_feeds
        self._retry_label = ""  # which retry feeds the original accepted
        self._backend: str | None = None
        self._fallback_reason: str | None = None
        self._providers_used: list[str] = []
        #: The original model and its outputs: what the noise floor is measured on.
        self._original: tuple[ir.Model, list[dict]] | None = None
        self._noise: dict[str, float] | None = None
        if self.verify.enabled and not self.feeds:
            raise VerificationError(
                "verification needs probe feeds; give data or disable verification"
            )

    def run(
        self, model: ir.Model, report: Report | None = None, original: ir.Model | None = None
    ) -> tuple[ir.Model, Report]:
        """Apply the passes to ``model`` (in place where no rollback happens); outputs are
        verified against ``original`` when given (the model as the user gave it, where
        loading had to convert it), else against ``model`` as it comes in."""
        report = report or Report()
        report.before = model_stats(model).as_dict()
        started = time.perf_counter()
        reference = self._reference_outputs(original or model, report)
        current = reference
        # kept only where a pass may use the noise floor (the floor is measured on it)
        loose = any(p.tolerance(self.verify.rtol) > self.verify.rtol for p in self.passes)
        self._original = (model.clone(), reference) if reference is not None and loose else None
        self._noise = None
        lossless = all(p.lossless for p in self.passes)
        given = (model.clone(), stored_bytes(model)) if lossless else None
        index = 0
        while index < len(self.passes):
            group = self._next_group(index)
            model, current = self._run_group(group, model, current, report)
            index += len(group)
        if given is not None and any(r.status == "applied" for r in report.passes):
            grown = stored_bytes(model) - given[1]
            if grown > 0:  # a lossless result is never larger than what it was given
                report.warnings.append(
                    f"the lossless passes would grow the model by {grown} bytes: kept as given"
                )
                for record in report.passes:
                    if record.status == "applied":
                        record.status, record.reason = "rolled-back", "the result grew the file"
                model, current = given[0], reference
        if reference is not None:
            # ``current`` always holds the outputs of ``model`` (rollbacks restore both).
            comparison = compare_runs(reference, current)
            rtol = self._final_rtol(report)
            ok = self._accepts(comparison, rtol) or not lossless
            report.verification = self._verification(comparison, rtol)
            report.verification_status = "passed" if ok else "failed"
        report.after = model_stats(model).as_dict()
        report.seconds = time.perf_counter() - started
        return model, report

    def _next_group(self, start: int) -> list[SqueezePass]:
        """Consecutive lossless passes are verified together (one model run, not one each)."""
        group = [self.passes[start]]
        if not (self.verify.enabled and self.verify.group_lossless and group[0].lossless):
            return group
        for squeeze_pass in self.passes[start + 1 :]:
            if not squeeze_pass.lossless:
                break
            group.append(squeeze_pass)
        return group

    def _run_group(
        self, group: list[SqueezePass], model: ir.Model, current: list[dict] | None, report: Report
    ) -> tuple[ir.Model, list[dict] | None]:
        """Run ``group`` with one verification; on failure, redo it pass by pass so only the
        culprit is rolled back."""
        if len(group) == 1 or current is None:
            for squeeze_pass in group:
                model, current = self._run_one(squeeze_pass, model, current, report)
            return model, current
        snapshot, first_record = model.clone(), len(report.passes)
        for squeeze_pass in group:
            model, _ = self._run_one(squeeze_pass, model, None, report)
        records = report.passes[first_record:]
        for record, squeeze_pass in zip(records, group, strict=True):
            record.tolerance = squeeze_pass.tolerance(self.verify.rtol)
        if not any(r.status == "applied" for r in records):
            return model, current
        base = self.verify.rtol
        rtol = base + sum(
            r.tolerance - base for r in records if r.status == "applied" and r.tolerance > base
        )
        try:
            outputs = self._outputs(model)
            comparison = compare_runs(current, outputs)
            ok = self._accepts(comparison, rtol)
        except RuntimeSessionError:
            ok = False
        if ok:
            summary = self._verification(comparison, rtol)
            summary["summary"] = f"group of {len(group)}: {summary['summary']}"
            for record in records:
                if record.status == "applied":
                    record.verification = summary
            return model, outputs
        logger.info("group of %d passes failed verification; verifying them one by one", len(group))
        del report.passes[first_record:]
        model = snapshot
        for squeeze_pass in group:
            model, current = self._run_one(squeeze_pass, model, current, report)
        return model, current

    def _accepts(self, comparison: Comparison, rtol: float) -> bool:
        """Within ``rtol``; or, for passes allowed to reassociate float math, within the
        noise onnxruntime's optimizer adds. That floor matters where outputs are ~0 on the
        probe feeds (a text detector on random pixels): their scale is itself rounding noise,
        and no relative bar separates a fusion from a bug there."""
        if comparison.within(rtol):
            return True
        if rtol <= self.verify.rtol or self._original is None:
            return False
        if self._noise is None:
            self._noise = self._runtime_noise()
        accepted = comparison.within(rtol, self._noise)
        if accepted:
            logger.info("accepted within %gx onnxruntime's optimizer noise", NOISE_FACTOR)
        return accepted

    def _verification(self, comparison: Comparison, rtol: float) -> dict[str, Any]:
        """The comparison for the report, saying when the noise floor is what let it pass."""
        summary = comparison.summary()
        floor = self._noise or {}
        if floor and not comparison.within(rtol) and comparison.within(rtol, floor):
            summary += (
                f"; within {NOISE_FACTOR:g}x the change onnxruntime's optimizer makes "
                "(outputs at rounding-noise scale on these feeds)"
            )
        return {**comparison.as_dict(), "noise_floor": floor or None, "summary": summary}

    def _runtime_noise(self) -> dict[str, float]:
        """Per output, NOISE_FACTOR x how far onnxruntime's default optimizations move the
        original model's outputs from the plain graph's on the probe feeds."""
        assert self._original is not None
        model, reference = self._original
        if self._backend != "onnxruntime":
            return {}
        try:
            optimized = Session(model, self.verify.providers, optimize=True)
            noise = compare_runs(reference, optimized.run_all(self.feeds))
        except RuntimeSessionError:
            return {}
        return {o.name: NOISE_FACTOR * o.max_abs for o in noise.outputs if o.mismatch is None}

    def _final_rtol(self, report: Report) -> float:
        """Exact passes keep the base tolerance; each applied looser pass adds its own."""
        base = self.verify.rtol
        extra = sum(
            p.tolerance - base
            for p in report.passes
            if p.status == "applied" and p.tolerance and p.tolerance > base
        )
        return base + extra

    def _reference_outputs(self, model: ir.Model, report: Report) -> list[dict] | None:
        if not self.verify.enabled:
            report.verification_status = "skipped"
            report.warnings.append("verification disabled: outputs were not compared")
            return None
        try:
            outputs = self._outputs(model)
        except RuntimeSessionError as exc:
            if str(exc).startswith("onnxruntime cannot load"):  # no input can help
                raise VerificationError(
                    f"cannot verify: {exc}; squeeze it unverified with verify=False"
                ) from exc
            outputs = self._retry(model, report)
            if outputs is None:
                raise VerificationError(
                    f"cannot verify: the original model fails on the probe feeds ({exc}); "
                    "give real inputs (data=), input shapes (shapes=), or disable verification (verify=False)"
                ) from exc
            report.warnings.append(
                f"the original model rejects the default probe inputs ({_innermost(exc)}); "
                f"verified on {self._retry_label} instead"
            )
        if _nothing_finite(outputs):
            raise VerificationError(
                "cannot verify: the original model's outputs are NaN/inf on every probe input, "
                "so any model would match them; give inputs it computes numbers for (data=)"
            )
        report.providers = list(self._providers_used)
        report.verification_backend = self._backend
        if self._fallback_reason:
            report.warnings.append(f"{self._fallback_reason}; verified with onnx.reference instead")
        return outputs

    def _retry(self, model: ir.Model, report: Report) -> list[dict] | None:
        """Outputs on the first retry feeds the original accepts (they become the probes)."""
        first = self.feeds
        for label, feeds in self._retry_feeds:
            self.feeds = feeds
            try:
                outputs = self._outputs(model)
            except RuntimeSessionError:
                continue
            self._retry_label = label
            return outputs
        self.feeds = first
        return None

    def _outputs(self, model: ir.Model) -> list[dict]:
        """Outputs on the probe feeds; the backend that ran the original runs every later model."""
        backend = self._backend or ("auto" if self.verify.reference_fallback else "onnxruntime")
        session = Session(model, self.verify.providers, backend=backend)
        self._backend = "reference" if session.backend == "onnx.reference" else "onnxruntime"
        self._fallback_reason = session.fallback_reason
        self._providers_used = session.providers
        return session.run_all(self.feeds)

    def _run_one(
        self, squeeze_pass: SqueezePass, model: ir.Model, current: list[dict] | None, report: Report
    ) -> tuple[ir.Model, list[dict] | None]:
        record = PassRecord(squeeze_pass.describe(), squeeze_pass.lossless)
        report.passes.append(record)
        snapshot = model.clone()
        started = time.perf_counter()
        try:
            result = squeeze_pass(model)
        except Exception as exc:  # a pass bug must not cost the user their model
            logger.debug("pass %s raised", record.name, exc_info=True)
            record.seconds = time.perf_counter() - started
            return self._rollback(
                record, snapshot, current, f"pass raised {type(exc).__name__}: {exc}"
            )
        record.seconds = time.perf_counter() - started
        record.modified = result.modified
        record.stats = dict(result.stats) if isinstance(result, SqueezeResult) else {}
        if not result.modified:
            record.status = "unchanged"
            return model, current
        problem = structural_problem(model) if self.verify.check_structure else None
        if problem:
            return self._rollback(record, snapshot, current, f"invalid graph: {problem}")
        if current is None:
            return model, current
        if squeeze_pass.preflight and self._backend != "reference":
            crash = crashes_onnxruntime(model, self.verify.providers)
            if crash:
                return self._rollback(record, snapshot, current, f"model no longer runs: {crash}")
        try:
            outputs = self._outputs(model)
        except RuntimeSessionError as exc:
            return self._rollback(record, snapshot, current, f"model no longer runs: {exc}")
        comparison = compare_runs(current, outputs)
        record.tolerance = squeeze_pass.tolerance(self.verify.rtol)
        accepted = self._accepts(comparison, record.tolerance)  # may measure the noise floor
        record.verification = self._verification(comparison, record.tolerance)
        if squeeze_pass.lossless and not accepted:
            return self._rollback(
                record,
                snapshot,
                current,
                f"changed outputs beyond tolerance ({comparison.summary()})",
            )
        return model, outputs

    @staticmethod
    def _rollback(
        record: PassRecord, snapshot: ir.Model, current: list[dict] | None, reason: str
    ) -> tuple[ir.Model, list[dict] | None]:
        record.status = "failed" if reason.startswith("pass raised") else "rolled-back"
        record.reason = reason
        logger.warning("pass %s rolled back: %s", record.name, reason)
        return snapshot, current


def _nothing_finite(outputs: list[dict]) -> bool:
    """True when every float output value on every feed is NaN/inf (and there is one)."""
    arrays = [np.asarray(v) for feed in outputs for v in feed.values()]
    floats = [a for a in arrays if a.dtype.kind == "f" and a.size]
    return bool(floats) and not any(np.isfinite(a).any() for a in floats)


def structural_problem(model: ir.Model) -> str | None:
    """What onnx.checker says is wrong with the model, or None.

    External weights stay external: the checker then only needs their files to exist, so
    it runs on a weightless copy in a temporary folder with empty stand-in data files.
    """
    if not has_external_tensors(model) and initializer_bytes(model) > 1_800_000_000:
        logger.info("structural check skipped: weights above 2 GB are held in memory")
        return None
    # Big in-memory weights are checked as external data too: the checker then reads no
    # weight bytes, which are most of its time on a large model.
    with weightless(model) as detached:
        proto = serialize(model)
    try:
        if has_external_tensors(model) or detached:
            _check_with_stand_ins(proto)
        else:
            onnx.checker.check_model(proto)
    except Exception as exc:
        text = str(exc).strip().splitlines()
        return (text[0] if text else type(exc).__name__)[:300]
    return None


def _check_with_stand_ins(proto: onnx.ModelProto) -> None:
    with scratch_dir("check") as tmp:
        for tensor in iter_tensor_protos(proto.graph):
            for entry in tensor.external_data:
                if entry.key == "location":
                    stand_in = Path(tmp, entry.value)
                    stand_in.parent.mkdir(parents=True, exist_ok=True)
                    stand_in.touch()
        path = Path(tmp, "model.onnx")
        path.write_bytes(proto.SerializeToString())
        onnx.checker.check_model(str(path))


def _innermost(exc: Exception, limit: int = 160) -> str:
    """onnxruntime nests the failing node's message in each enclosing If/Loop's: keep the
    innermost, which names the actual problem."""
    text = str(exc).rsplit("Status Message:", 1)[-1].strip()
    return text if len(text) <= limit else text[: limit - 3] + "..."
