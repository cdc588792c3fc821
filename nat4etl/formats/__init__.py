"""Readers: bytes -> plain tables and arrays in file units, with no NAT4 meaning.

    archive           safe tar / tar.gz / zip member iteration, nested archives, extraction
    nems0             NEMS0 recording: meta, signal JSON, epoch tables, data by callback
    nems0_csv         streaming ``%.18e`` rasterized CSV -> float32 blocks
    nems0_h5          PointProcess / TiledSignal HDF5 -> key -> array
    wav               wav -> float32 samples, sample rate
    pred_correlation  ``<area>_pred_correlation.csv`` -> Arrow table
    zenodo            record JSON -> (name, size_bytes, md5, url)

Every reader raises `nat4etl.errors.FormatError` (or its `ArchiveError` subclasses) naming
file and member; stages decide what the data means.
"""
