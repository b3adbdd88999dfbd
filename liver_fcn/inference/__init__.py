"""Bundle inference on new CTs: input checks, self-describing checkpoints, per-case outputs.

MONAI gives the engine (SupervisedEvaluator, SliceInferer, DataLoader workers) and the transforms;
:mod:`liver_fcn.transforms` brings the logits back onto the input's grid; this package adds what a
clinical input and an archive of thousands need around them, one module per concern:

* :mod:`~liver_fcn.inference.cases` - :func:`collect_cases` resolves ``--input`` (a DICOM series
  folder, a NIfTI file, or a datalist JSON of many) and checks every case *before* anything is
  written, so a bad input never leaves half of the outputs behind; :func:`shard` gives each
  ``torchrun`` process its share;
* the checkpoint (:mod:`liver_fcn.checkpoint`) carries the settings of its network and
  preprocessing, so inference rebuilds both as training had them without being told;
  :class:`~liver_fcn.networks.precision.Precision` runs the network in bf16 where the device has it
  natively (``precision: auto``) and counts the network's own time;
* :mod:`~liver_fcn.inference.outputs` - the case's outputs are named steps of inference.json's
  post-processing, each switchable or replaceable: :class:`WriteMaskd` (the uint8 NIfTI mask on the
  input's own grid), :class:`CaseReportd` (volumes, liver extent, slice range, spacing, QC flags:
  :mod:`~liver_fcn.inference.report`), :class:`WriteOverlayd` (a PNG), :class:`WriteDicomSegd`
  (a DICOM Segmentation object) and :class:`WriteRTStructd` (an RT Structure Set of contours),
  between :class:`StageCased` and :class:`CommitCased`, which moves the case's files into place as
  one set;
* :mod:`~liver_fcn.inference.inferer` - :class:`SliceProgressInferer`: MONAI's SliceInferer with a
  bar over the slices of a case on a terminal;
* :mod:`~liver_fcn.inference.runner` - :class:`CaseDataset` and :class:`CaseRunner` make a case that
  fails after the checks a line in the summary instead of the end of the run; :func:`finish` writes
  the one ``summary.json`` of all processes and sets the exit status.

Everything is importable from ``liver_fcn.inference`` as the bundle configs name it.
"""

from liver_fcn.inference.cases import check_nifti_affine, check_output_dir, collect_cases, shard
from liver_fcn.inference.inferer import SliceProgressInferer
from liver_fcn.inference.outputs import (
    CaseOutput,
    CaseReportd,
    CommitCased,
    StageCased,
    WriteDicomSegd,
    WriteMaskd,
    WriteOverlayd,
    WriteRTStructd,
    write_nifti_atomic,
)
from liver_fcn.inference.report import case_report, quality_flags, summary_line
from liver_fcn.inference.runner import CaseDataset, CaseRunner, finish, init_distributed
from liver_fcn.networks.precision import Precision, default_device, native_bf16, resolve_precision
from liver_fcn.options import flag

__all__ = [
    "CaseDataset",
    "CaseOutput",
    "CaseReportd",
    "CaseRunner",
    "CommitCased",
    "Precision",
    "SliceProgressInferer",
    "StageCased",
    "WriteDicomSegd",
    "WriteRTStructd",
    "WriteMaskd",
    "WriteOverlayd",
    "case_report",
    "check_nifti_affine",
    "check_output_dir",
    "collect_cases",
    "default_device",
    "finish",
    "flag",
    "init_distributed",
    "native_bf16",
    "quality_flags",
    "resolve_precision",
    "shard",
    "summary_line",
    "write_nifti_atomic",
]
