"""Dataset readers behind spec strings: ``load_dataset("fashion-mnist:test@0-4")``.

Every reader returns uint8 N x H x W x C images (C in 1, 3) in an `ImageSet`, with int64 labels
when the source has them. Packaged datasets (mnist, fashion-mnist, animals, textures, photos)
are cached in-process; user files (folder, npz, cifar, svhn) are read fresh on every call.
Pickled formats are read with a restricted unpickler (`safe_pickle`), never plain `pickle`.
"""

from __future__ import annotations

from sdns_monitor.data.imageset import ImageSet
from sdns_monitor.data.load import load_dataset
from sdns_monitor.data.spec import KNOWN, DatasetSpec, parse_spec, usage

__all__ = ["KNOWN", "DatasetSpec", "ImageSet", "load_dataset", "parse_spec", "usage"]
