"""Hostile SQL for the sandbox tests (API and browser): each must be refused, read nothing
outside the run's tables and write nothing anywhere."""

from __future__ import annotations

from pathlib import Path

SECRET = "top-secret-4711"


def attacks(run: Path, secret: Path, outside: Path) -> list[str]:
    """``secret`` holds :data:`SECRET`; ``outside`` is a folder that must stay empty."""
    return [
        f"select * from read_csv('{secret}')",
        f"select * from read_text('{secret}')",
        f"select * from read_blob('{secret}')",
        f"select * from read_json_auto('{secret}')",
        f"select * from sniff_csv('{secret}')",
        f"select * from '{secret}'",
        f"select * from glob('{secret.parent}/*')",
        f"select * from read_parquet('{run}/metrics/**/*.parquet')",  # even the run's own files
        f"copy (select 42) to '{outside}/x.csv'",
        f"copy metrics to '{run}/stolen.parquet'",  # inside the run's folder too
        f"export database '{outside}/dump'",
        f"attach '{outside}/other.duckdb' as other",
        "install httpfs",
        "load httpfs",
        "select * from read_parquet('https://example.com/x.parquet')",
        f"select * from sqlite_scan('{outside}/x.db', 't')",  # extension auto-loading
        "set enable_external_access = true",
        "set lock_configuration = false",
        "reset enable_external_access",
        f"set temp_directory = '{outside}'",
        "pragma threads = 64",
        f"set allowed_directories = ['{secret.parent}']",
    ]


#: Documented queries (README, docs/storage.md, the dashboard's default) that must still work.
EXAMPLES = [
    "select method, avg(avg_drop) from metrics group by method",
    "select method, avg(avg_drop), 100 * avg(increase) from metrics group by method",
    "select * from manifest",
    "select method, metric, value from summary",
    "select method, count(*) as images, avg(avg_drop) as avg_drop, avg(insertion) as insertion "
    "from metrics group by method order by method",
]
