"""dlt's answer to the same job, for the comparison in bench.py (benchmark only).

dlt is never a dependency of the uploader: bench.py runs this file with
`uv run --with "dlt[deltalake,sql_database]" --with pyarrow --with sqlalchemy`.

The pipeline is the one dlt's docs give for the job: the `sql_table` resource on the
SQLite file, incremental on the timestamp column (`dlt.sources.incremental`), into the
`filesystem` destination at a local path with `table_format="delta"`. The backend is
"pyarrow" (rows to Arrow tables) or "sqlalchemy" (dlt's default: rows to dicts).
Pipeline state lives in STATE (`pipelines_dir`), so a second run with the same
STATE is an incremental cycle; a fresh STATE is a first upload.

    uv run ... bench/dlt_job.py DB LAKE BACKEND STATE [--table sensor_readings]
"""

import argparse
import os

# No telemetry (this machine reaches no tracker; a timeout would be measured).
os.environ.setdefault("RUNTIME__DLTHUB_TELEMETRY", "false")
os.environ.setdefault("RUNTIME__LOG_LEVEL", "WARNING")

import dlt  # noqa: E402
from dlt.sources.sql_database import sql_table  # noqa: E402


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("db")
    parser.add_argument("lake")
    parser.add_argument("backend", choices=("pyarrow", "sqlalchemy"))
    parser.add_argument("state")
    parser.add_argument("--table", default="sensor_readings")
    parser.add_argument("--timestamp-col", default="timestamp")
    args = parser.parse_args()
    resource = sql_table(credentials=f"sqlite:///{os.path.abspath(args.db)}",
                         table=args.table, backend=args.backend,
                         incremental=dlt.sources.incremental(args.timestamp_col))
    destination = dlt.destinations.filesystem(
        bucket_url="file://" + os.path.abspath(args.lake))
    pipeline = dlt.pipeline(pipeline_name=f"bench_{args.backend}", destination=destination,
                            dataset_name="sensors", pipelines_dir=os.path.abspath(args.state))
    info = pipeline.run(resource, table_format="delta")
    info.raise_on_failed_jobs()
    rows = pipeline.last_trace.last_normalize_info.row_counts.get(args.table, 0)
    print(f"dlt: {rows} rows -> {args.lake} ({args.backend})")


if __name__ == "__main__":
    main()
