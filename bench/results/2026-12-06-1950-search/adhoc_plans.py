"""Ad hoc: late materialisation of the page, the policy's settings as InitPlans, covering stats index."""
import re, sys, time, tempfile
from pathlib import Path
import psycopg
from psycopg import sql
from bench.run import bench_servers, progress
from bench.search_reads import seed, vocabulary, statement, READER_ROLE, TENANT
from projections.migrations import migrate
from projections.read_model import grant_reader
from projections.queries import upcast_sql

ROWS = int(sys.argv[1])
def run_explain(url, text):
    with psycopg.connect(url) as conn:
        conn.execute("SET activities.reader = 'on'"); conn.execute(f"SET ROLE {READER_ROLE}")
        conn.execute("SELECT set_config('activities.tenant_id', %s, true), set_config('activities.app_id', '', true)", (TENANT,))
        best = None
        for _ in range(3):
            rows = conn.execute(f"EXPLAIN (ANALYZE, BUFFERS) {text}").fetchall()
            plan = "\n".join(r[0] for r in rows)
            ms = float(re.search(r"Execution Time: ([0-9.]+)", plan).group(1))
            if best is None or ms < best[0]: best = (ms, plan)
        conn.rollback()
    return best

def texts(url, name, params):
    q, v = statement(name, params)
    with psycopg.connect(url) as conn:
        text = psycopg.ClientCursor(conn).mogrify(q, v)
        up = upcast_sql(sql.SQL("a.document")).as_string(conn)
    where = re.split(r" (?:ORDER BY|GROUP BY) ", text.split(" WHERE ", 1)[1])[0]
    late = (f"SELECT a.id, a.activity_date AS sort_value, {up}::text AS document FROM (SELECT id, activity_date FROM activities "
            f"WHERE {where} ORDER BY activity_date DESC NULLS LAST, id DESC LIMIT 51) AS page JOIN activities a ON a.id = page.id "
            "ORDER BY page.activity_date DESC NULLS LAST, page.id DESC")
    return text, late

root = Path(tempfile.mkdtemp(prefix="exp-"))
with bench_servers(root) as servers:
    url = servers.fresh_database()
    migrate(url, after_first=grant_reader)
    progress(f"seeding {ROWS} with migrations 1-4 (trigger on insert)")
    print(seed(url, ROWS, vocabulary()), flush=True)
    with psycopg.connect(url, autocommit=True) as c:
        c.execute("VACUUM (ANALYZE) activities")
        c.execute("ALTER FUNCTION pg_catalog.ts_match_vq(tsvector, tsquery) LEAKPROOF")
        c.execute("ALTER FUNCTION pg_catalog.arraycontains(anyarray, anyarray) LEAKPROOF")
    cases = [("q_rare_word", {"q": "issue"}), ("q_rare_word", {"q": "normalizes"}), ("q_two_words", {"q": "file hash"}),
             ("q_two_words", {"q": "self resets"}), ("q_prefix_3_4", {"q": "oct"}), ("q_mid_word", {"q": "integration"}),
             ("q_common_word", {"q": "specified"}), ("participant", {"participant": "ctc_01655"}),
             ("participant", {"participant": "ctc_00003"})]
    for name, params in cases:
        cur, late = texts(url, name, params)
        a, b = run_explain(url, cur), run_explain(url, late)
        print(f"\n#### {name} {params}: current SQL {a[0]:.1f} ms, late materialisation {b[0]:.1f} ms (best of 3, leakproof on)", flush=True)
        print(a[1]); print("-- late:"); print(b[1], flush=True)
    st = ("stats_owner_month", {"group_by": "owner_id", "activity_date_from": "2020-08-01T00:00:00Z", "activity_date_to": "2020-08-31T23:59:59Z"})
    q, v = statement(*st)
    with psycopg.connect(url) as conn:
        stext = psycopg.ClientCursor(conn).mogrify(q, v)
    res = {"stats as is": run_explain(url, stext)}
    with psycopg.connect(url, autocommit=True) as c:
        c.execute("""ALTER POLICY activities_scope ON activities USING (
            (SELECT current_setting('activities.reader', true)) IS DISTINCT FROM 'on'
            OR (tenant_id = (SELECT current_setting('activities.tenant_id', true))
                AND (coalesce((SELECT current_setting('activities.app_id', true)), '') = ''
                     OR app_id = (SELECT current_setting('activities.app_id', true)))))""")
    res["stats, policy settings as InitPlans"] = run_explain(url, stext)
    with psycopg.connect(url, autocommit=True) as c:
        c.execute("CREATE INDEX activities_activity_date_stats ON activities (tenant_id, activity_date) INCLUDE (owner_id, app_id, is_deleted)")
        c.execute("VACUUM (ANALYZE) activities")
    res["stats, InitPlans + covering index"] = run_explain(url, stext)
    for k, (ms, plan) in res.items():
        print(f"\n#### {k}: {ms:.1f} ms"); print(plan, flush=True)
    # participant / q with the InitPlan policy too
    cur, late = texts(url, "q_rare_word", {"q": "issue"})
    a, b = run_explain(url, cur), run_explain(url, late)
    print(f"\n#### q issue with InitPlan policy: current {a[0]:.1f} ms, late {b[0]:.1f} ms", flush=True)
