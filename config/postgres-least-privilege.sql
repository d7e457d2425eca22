-- A least-privilege PostgreSQL role for fieldsync's postgres sink (hq_server/sinks/postgres.py).
--
-- The sink needs to log in, see one schema, and insert, update, delete and read rows of ONE table.
-- Nothing else: no ownership, no CREATE, no TRUNCATE, no other table. Run as the table's owner or a
-- superuser, in the target database; the script is idempotent (run it again for another table):
--
--   psql -d finance -v role=fieldsync_sink -v schema=public -v table=fieldsync_records \
--        -f config/postgres-least-privilege.sql
--
-- Then give the role a password interactively (never on a command line or in a file under version
-- control) and store it where the sink reads it (`password_env` or a 0600 `password_file`):
--
--   psql -d finance -c '\password fieldsync_sink'
--
-- The target table is the business system's; the sink only needs, besides the mapped columns:
--
--   CREATE TABLE public.fieldsync_records (
--       key             text PRIMARY KEY,      -- key_column: UNIQUE or PRIMARY KEY (ON CONFLICT)
--       -- ... mapped columns, or one jsonb column in payload_column mode ...
--       idempotency_key text,                  -- idempotency_column: the last change applied
--       change_seq      bigint NOT NULL        -- change_seq_column: an older replay never wins
--   );
--
-- Hardening of the database as a whole (not done here, it affects every role):
--   REVOKE CONNECT ON DATABASE finance FROM PUBLIC;   -- then only granted roles may connect
--   REVOKE CREATE ON SCHEMA public FROM PUBLIC;       -- the default before PostgreSQL 15

\set ON_ERROR_STOP on

\if :{?role}
\else
\set role fieldsync_sink
\endif
\if :{?schema}
\else
\set schema public
\endif
\if :{?table}
\else
\set table fieldsync_records
\endif

-- 1. The login role: no superuser, no CREATEDB/CREATEROLE, no replication, subject to row-level
--    security, inherits nothing. Created only if missing, so the script can be run once per table.
--    (`ALTER ROLE fieldsync_sink CONNECTION LIMIT n` caps it; keep n >= the sinks' pool_size sum.)
SELECT format('CREATE ROLE %I LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS '
              'NOINHERIT', :'role')
WHERE NOT EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = :'role')
\gexec

-- 2. May connect to this database (and, once PUBLIC's CONNECT is revoked, to no other).
SELECT format('GRANT CONNECT ON DATABASE %I TO %I', current_database(), :'role')
\gexec

-- 3. May look up objects in the target's schema (USAGE), but not create any (no CREATE).
GRANT USAGE ON SCHEMA :"schema" TO :"role";

-- 4. The target table only:
--    INSERT          new records;
--    UPDATE          ON CONFLICT (key) DO UPDATE;
--    DELETE          deleted records;
--    SELECT          ON CONFLICT ... DO UPDATE ... WHERE t.change_seq < EXCLUDED.change_seq reads the
--                    existing row, and DELETE ... WHERE key = ... reads the key: both need SELECT.
--    Column-level grants work too (GRANT SELECT (key, change_seq), INSERT (...), ...) if the table
--    holds columns the sink must not see.
GRANT SELECT, INSERT, UPDATE, DELETE ON TABLE :"schema".:"table" TO :"role";

-- A `serial` column filled by its default also needs its sequence (identity columns do not):
--   GRANT USAGE ON SEQUENCE public.fieldsync_records_id_seq TO fieldsync_sink;
