-- The activities read model: one row per activity, the latest document, typed columns for every
-- list filter and sort (CONTRACT.md section 5). Written only by projections/read_model.py.
--
-- `{table}` is replaced by the (validated, quoted) table name and `{table}_x` by an index name
-- derived from it, so that `activities projections rebuild` can build a second copy aside under
-- another name and switch it in by renaming.
--
-- Index choices (every list query filters on tenant_id, and on app_id for integration tokens):
-- * each sort key has one b-tree (tenant_id, key DESC NULLS LAST, id DESC). The default sort is
--   -activity_date; created_at and updated_at are NOT NULL so their ascending order is served by
--   the same index scanned backwards (the query asks for ASC NULLS FIRST, which is equivalent).
--   activity_date and due_date also get an ascending NULLS LAST index, because NULLs come last in
--   both directions and a backward scan would put them first.
-- * the equality filters that scope a CRM page (account, deal, owner, primary contact, app) each
--   lead a partial b-tree ordered by the default sort, so "this account's activities, newest
--   first" is an index range scan that stops after `limit` rows.
-- * contact_ids and tags are arrays matched with @> : GIN indexes.
-- * id is text with the C collation, so the tie-break order is the byte order of the ULIDs.

CREATE TABLE IF NOT EXISTS {table} (
    id            text COLLATE "C" NOT NULL,
    tenant_id     text NOT NULL,
    app_id        text,
    account_id    text,
    deal_id       text,
    contact_id    text,
    contact_ids   text[] NOT NULL DEFAULT ARRAY[]::text[],
    owner_id      text,
    type          text,
    status        text,
    tags          text[] NOT NULL DEFAULT ARRAY[]::text[],
    activity_date timestamptz,
    due_date      timestamptz,
    created_at    timestamptz NOT NULL,
    updated_at    timestamptz NOT NULL,
    is_deleted    boolean NOT NULL,
    version       integer NOT NULL,
    position      bigint NOT NULL,
    document      jsonb NOT NULL,
    CONSTRAINT {table}_pkey PRIMARY KEY (id)
);

CREATE INDEX IF NOT EXISTS {table}_activity_date_desc
    ON {table} (tenant_id, activity_date DESC NULLS LAST, id DESC);
CREATE INDEX IF NOT EXISTS {table}_activity_date_asc
    ON {table} (tenant_id, activity_date ASC NULLS LAST, id ASC);
CREATE INDEX IF NOT EXISTS {table}_due_date_desc
    ON {table} (tenant_id, due_date DESC NULLS LAST, id DESC);
CREATE INDEX IF NOT EXISTS {table}_due_date_asc
    ON {table} (tenant_id, due_date ASC NULLS LAST, id ASC);
CREATE INDEX IF NOT EXISTS {table}_created_at
    ON {table} (tenant_id, created_at DESC NULLS LAST, id DESC);
CREATE INDEX IF NOT EXISTS {table}_updated_at
    ON {table} (tenant_id, updated_at DESC NULLS LAST, id DESC);

CREATE INDEX IF NOT EXISTS {table}_app
    ON {table} (tenant_id, app_id, activity_date DESC NULLS LAST, id DESC) WHERE app_id IS NOT NULL;
CREATE INDEX IF NOT EXISTS {table}_account
    ON {table} (tenant_id, account_id, activity_date DESC NULLS LAST, id DESC) WHERE account_id IS NOT NULL;
CREATE INDEX IF NOT EXISTS {table}_deal
    ON {table} (tenant_id, deal_id, activity_date DESC NULLS LAST, id DESC) WHERE deal_id IS NOT NULL;
CREATE INDEX IF NOT EXISTS {table}_contact
    ON {table} (tenant_id, contact_id, activity_date DESC NULLS LAST, id DESC) WHERE contact_id IS NOT NULL;
CREATE INDEX IF NOT EXISTS {table}_owner
    ON {table} (tenant_id, owner_id, activity_date DESC NULLS LAST, id DESC) WHERE owner_id IS NOT NULL;

CREATE INDEX IF NOT EXISTS {table}_contact_ids ON {table} USING gin (contact_ids);
CREATE INDEX IF NOT EXISTS {table}_tags ON {table} USING gin (tags);

-- Row-level security: a second wall behind the tenant and app filters every query carries.
-- Read-model query connections set `activities.reader = on` (and, where the role exists, run as
-- activities_reader, so that the rule also binds a superuser connection); each query transaction
-- then sets `activities.tenant_id` / `activities.app_id` to the caller's. A reader query that
-- forgets its tenant filter sees only the caller's rows, and one that forgets to set the caller
-- sees nothing. Writers (the projector, rebuild) do not set `activities.reader` and see all rows.
ALTER TABLE {table} ENABLE ROW LEVEL SECURITY;
ALTER TABLE {table} FORCE ROW LEVEL SECURITY;
DROP POLICY IF EXISTS {table}_scope ON {table};
CREATE POLICY {table}_scope ON {table} USING (
    current_setting('activities.reader', true) IS DISTINCT FROM 'on'
    OR (tenant_id = current_setting('activities.tenant_id', true)
        AND (coalesce(current_setting('activities.app_id', true), '') = ''
             OR app_id = current_setting('activities.app_id', true)))
);
