"""Build: verified rows weighted, selected and deduplicated into a sharded Parquet dataset with its card and
manifest (`RUN/dataset/`), and published from there. The stage itself is `stage.build`."""
