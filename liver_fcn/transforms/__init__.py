"""MONAI transforms the bundle needs and MONAI does not have, one module per concern.

* :mod:`~liver_fcn.transforms.io` - :class:`LoadCTd` (``LoadImaged`` restricted to the one reader
  that fits the input, through :func:`liver_fcn.data.ct.load_ct`, so that a bad series is reported
  instead of being read by a fallback reader) and :class:`LoadOrganMasksd` (a patient's organ mask
  series merged into one class map on the CT's grid, recording which classes are annotated);
  :class:`CopyAsTyped` (``CopyItemsd`` and ``CastToTyped`` in one conversion).
* :mod:`~liver_fcn.transforms.labels` - :class:`EncodePartialLabeld`: "this background pixel may also
  be any class that is not annotated for this patient", packed into the label for
  :class:`~liver_fcn.losses.PartialLabelCrossEntropyLoss`; :class:`BoneByDensityd`, one definition of
  bone for training whatever convention a patient's bone mask was drawn by; class-map helpers.
* :mod:`~liver_fcn.transforms.geometry` - :func:`grid_size` (pixels across a field of view in mm),
  :func:`body_mask` (the body's largest air-separated region, ``CropForegroundd``'s ``select_fn``),
  :class:`InPlaneResampled` (in-plane resampling to a pixel spacing in mm with 2D anti-aliasing when
  downsampling, slices untouched) and :class:`AdjacentSlicesd` (2.5D neighbours at fixed distances
  in mm as channels); :class:`RandInPlaneAffined` (the in-plane rotation, zoom and shift of MONAI's
  ``RandRotated``, ``RandZoomd`` and ``RandAffined``, each with its own probability, in one
  resampling: :func:`inplane_affine`); :class:`ElasticWhenDrawnd`, MONAI's ``Rand2DElasticd``
  without its identity resampling of the slices it does not deform.
* :mod:`~liver_fcn.transforms.batch` - the training batch's own augmentations, on its device, each
  sample drawn as the slice transform it stands for draws a slice: :class:`BatchRandInPlaneAffined`,
  :class:`BatchRandFlipd`, :class:`BatchRandAdjustContrastd`, :class:`BatchRandSpatialCropd`, and
  :class:`PerSampled` (any slice transform, sample by sample).
* :mod:`~liver_fcn.transforms.inversion` - :func:`class_map_on_input_grid` / :class:`ResampleToInputd`:
  network logits back onto the input's own grid as a uint8 class map, chunk by chunk, from the two
  affines (what ``Invertd`` would do with full-resolution float probabilities, without holding them).
* :mod:`~liver_fcn.transforms.postprocessing` - :class:`KeepLargestComponentsd` (on each label's
  bounding box), :class:`FillHolesSlicewised` (holes of each axial slice: vessels open in 3D are
  enclosed in a slice), :class:`CountComponentsd`.
* :mod:`~liver_fcn.transforms.simulation` - :class:`SimulateScannerd` (thicker slabs, coarser pixels,
  more noise, a HU offset) and :class:`SimulateContrastPhased` (enhancement scaled toward unenhanced
  densities), for the scanner-shift and contrast-phase evaluations; :class:`RandContrastPhased`, each
  organ's enhancement scaled by its own random factor (or, for a share of the slices, every soft
  tissue's by one factor), as a training augmentation;
  :class:`RandGaussianNoiseTorchd`, MONAI's ``RandGaussianNoised`` drawing its noise with torch.

Each dictionary transform is a thin wrapper over a function on arrays (:func:`adjacent_slices`,
:func:`keep_largest_components`, :func:`fill_holes_slicewise`, :func:`bone_by_density`,
:func:`component_sizes_ml`, :func:`coarser_grid`, :func:`reimage`, :func:`class_map_by_majority`,
:func:`scale_enhancement`, :func:`scale_tissue_enhancement`, :func:`class_map_on_input_grid`), usable
without MONAI's dictionaries. Everything is importable from ``liver_fcn.transforms`` as the bundle
configs name it.
"""

from liver_fcn.data.ct import load_ct
from liver_fcn.transforms.batch import (
    BatchRandAdjustContrastd,
    BatchRandFlipd,
    BatchRandInPlaneAffined,
    BatchRandSpatialCropd,
    PerSampled,
)
from liver_fcn.transforms.geometry import (
    AdjacentSlicesd,
    ElasticWhenDrawnd,
    InPlaneResampled,
    RandInPlaneAffined,
    adjacent_slices,
    body_mask,
    grid_size,
    inplane_affine,
    inplane_affine_matrix,
)
from liver_fcn.transforms.inversion import ResampleToInputd, class_map_on_input_grid
from liver_fcn.transforms.io import CopyAsTyped, LoadCTd, LoadOrganMasksd
from liver_fcn.transforms.labels import BoneByDensityd, EncodePartialLabeld, bone_by_density, class_map_array
from liver_fcn.transforms.postprocessing import (
    CountComponentsd,
    FillHolesSlicewised,
    KeepLargestComponentsd,
    component_sizes_ml,
    fill_holes_slicewise,
    keep_largest_components,
)
from liver_fcn.transforms.simulation import (
    UNENHANCED_HU,
    RandContrastPhased,
    RandGaussianNoiseTorchd,
    SimulateContrastPhased,
    SimulateScannerd,
    class_map_by_majority,
    coarser_grid,
    reimage,
    scale_enhancement,
    scale_tissue_enhancement,
)
from liver_fcn.transforms.utils import as_numpy, like, voxel_spacing

__all__ = [
    "UNENHANCED_HU",
    "AdjacentSlicesd",
    "BatchRandAdjustContrastd",
    "BatchRandFlipd",
    "BatchRandInPlaneAffined",
    "BatchRandSpatialCropd",
    "BoneByDensityd",
    "ElasticWhenDrawnd",
    "CountComponentsd",
    "EncodePartialLabeld",
    "FillHolesSlicewised",
    "InPlaneResampled",
    "KeepLargestComponentsd",
    "CopyAsTyped",
    "LoadCTd",
    "LoadOrganMasksd",
    "PerSampled",
    "RandContrastPhased",
    "RandGaussianNoiseTorchd",
    "RandInPlaneAffined",
    "ResampleToInputd",
    "SimulateContrastPhased",
    "SimulateScannerd",
    "as_numpy",
    "adjacent_slices",
    "component_sizes_ml",
    "fill_holes_slicewise",
    "keep_largest_components",
    "class_map_by_majority",
    "coarser_grid",
    "reimage",
    "body_mask",
    "bone_by_density",
    "class_map_array",
    "class_map_on_input_grid",
    "grid_size",
    "inplane_affine",
    "inplane_affine_matrix",
    "like",
    "load_ct",
    "scale_enhancement",
    "scale_tissue_enhancement",
    "voxel_spacing",
]
