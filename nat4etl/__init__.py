"""nat4etl: the NAT4 auditory-cortex dataset as a columnar Parquet store."""

__version__ = "0.1.0"
