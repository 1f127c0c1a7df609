"""projections.database.conninfo: every parameter of the URL is kept (issue "Hardening")."""

from __future__ import annotations

from psycopg.conninfo import conninfo_to_dict

from projections.database import conninfo


def test_every_parameter_of_the_url_is_kept() -> None:
    url = (
        "postgresql://svc:p%40ss@db1:5432,db2:5433/crm?sslmode=verify-full&sslrootcert=/etc/ca.pem"
        "&application_name=activities&target_session_attrs=read-write&options=-c%20statement_timeout%3D5s"
    )
    assert conninfo_to_dict(conninfo(url)) == {
        "user": "svc",
        "password": "p@ss",
        "host": "db1,db2",
        "port": "5432,5433",
        "dbname": "crm",
        "sslmode": "verify-full",
        "sslrootcert": "/etc/ca.pem",
        "application_name": "activities",
        "target_session_attrs": "read-write",
        "options": "-c statement_timeout=5s",
    }


def test_defaults_fill_in_but_never_override_the_url() -> None:
    assert conninfo_to_dict(conninfo("dbname=crm", connect_timeout=5))["connect_timeout"] == "5"
    assert conninfo_to_dict(conninfo("dbname=crm connect_timeout=20", connect_timeout=5))["connect_timeout"] == "20"
