"""3D-IRCADb-01 discovery and extraction, strict DICOM series reading, datalists, phantoms."""

from liver_fcn.data.ct import load_ct
from liver_fcn.data.datasets import SliceDataset, TrainingSets, datalist_classes, load_datalist
from liver_fcn.data.dicom import CTSeriesReader, SeriesInfo, inspect_series
from liver_fcn.data.ircadb import DEFAULT_CLASSES, DEFAULT_ORGANS, find_patients, prepare, split_patients
from liver_fcn.data.phantom import make_phantom, write_phantoms

__all__ = [
    "CTSeriesReader",
    "DEFAULT_CLASSES",
    "DEFAULT_ORGANS",
    "SeriesInfo",
    "SliceDataset",
    "TrainingSets",
    "datalist_classes",
    "find_patients",
    "inspect_series",
    "load_ct",
    "load_datalist",
    "make_phantom",
    "prepare",
    "split_patients",
    "write_phantoms",
]
