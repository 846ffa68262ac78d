-- cdc-bridge: database setup by hand.
--
-- By default `cdc-bridge run` creates the publication and the slot itself
-- (postgres.create_if_missing: true), which needs a role that owns the tables. When a
-- DBA prefers to create them, run this script once and set
--
--     postgres:
--       create_if_missing: false     # the bridge then only checks they exist
--
-- Run it connected to the application database, as a superuser (on RDS: the master
-- user) or as the owner of the tables:
--
--     psql -v ON_ERROR_STOP=1 -d app -f sql/setup.sql
--
-- The names match config/example.yaml: role, slot and publication `cdc_bridge`,
-- table public.conversations. Change them together with the config.
--
-- ---------------------------------------------------------------------------------
-- 0. Server settings (not done by this script; each needs a restart)
--
-- Self-hosted, in postgresql.conf:
--     wal_level = logical
--     max_replication_slots and max_wal_senders: at least one free each (defaults: 10)
-- AWS RDS / Aurora PostgreSQL: in the DB (cluster) parameter group set
--     rds.logical_replication = 1
-- (a static parameter: reboot the instance for it to apply; it sets wal_level = logical).
-- The bridge refuses to start while SHOW wal_level does not say 'logical'.
--
-- The bridge's replication connection (replication=database) is matched in pg_hba.conf
-- by the database name like an ordinary one, not by the `replication` keyword.
-- ---------------------------------------------------------------------------------

-- 1. The login role the bridge connects as (postgres.dsn).
--
-- Self-hosted: REPLICATION lets it create slots and run START_REPLICATION.
CREATE ROLE cdc_bridge WITH LOGIN REPLICATION;
--
-- RDS / Aurora: only a real superuser may grant REPLICATION, which the master user is
-- not; use the rds_replication role instead. Replace the statement above with:
--     CREATE ROLE cdc_bridge WITH LOGIN;
--     GRANT rds_replication TO cdc_bridge;
--
-- RDS / Aurora with IAM database authentication (postgres.iam_auth: true; the bridge
-- then logs in with a fresh IAM auth token per connection, never with a password; the
-- instance needs IAM DB authentication enabled and the bridge's AWS role the
-- rds-db:connect permission for this user, see docs/operations.md):
--     CREATE ROLE cdc_bridge WITH LOGIN;
--     GRANT rds_iam TO cdc_bridge;
--     GRANT rds_replication TO cdc_bridge;
--
-- Password: set it interactively so it stays out of files and shell history,
--     \password cdc_bridge
-- in psql, and give it to the bridge as a secret file (postgres__password) or
-- CDC_BRIDGE_POSTGRES__PASSWORD.

-- 2. Privileges.
--
-- CONNECT on this database (written with format() so the script needs no edit).
DO $$
BEGIN
    EXECUTE format('GRANT CONNECT ON DATABASE %I TO cdc_bridge', current_database());
END
$$;
GRANT USAGE ON SCHEMA public TO cdc_bridge;
-- SELECT on the streamed tables. Streaming changes does not need it (the walsender does
-- not check table privileges), but reading the tables does: checks by hand, and the
-- snapshot/backfill of existing rows, which the bridge does not do yet.
GRANT SELECT ON public.conversations TO cdc_bridge;

-- 3. Replica identity.
--
-- By default PostgreSQL logs only the primary key of a deleted row, so a DELETE would
-- not carry conversation_uuid and could not be routed to messages.<conversation_uuid>
-- (the bridge refuses to start with a subject column the replica identity does not
-- cover). FULL logs the whole old row on UPDATE and DELETE, which also lets the bridge
-- fill in a TOASTed column (long `content`) that an UPDATE left unchanged: pgoutput
-- sends no new value for it, and the bridge takes it from the old row.
-- Cost: more WAL per UPDATE and DELETE. Takes a short ACCESS EXCLUSIVE lock on the
-- table; needs the table owner. Do it before creating the slot, so that no change the
-- slot decodes was logged without it.
ALTER TABLE public.conversations REPLICA IDENTITY FULL;

-- 4. The publication: which tables' changes PostgreSQL sends (postgres.publication).
--
-- Must be created by the owner of the tables (or a member of the owning role) or a
-- superuser, who also needs CREATE on the database. It covers the configured tables
-- only; to stream another table later:
--     ALTER PUBLICATION cdc_bridge ADD TABLE public.other_table;
-- publish_via_partition_root: changes of a partitioned table carry the table's own name
-- (the one in the config), not the names of its partitions. cdc-bridge creates its
-- publications the same way.
-- Row filters (tables.*.where in the config, PostgreSQL 15+) belong here too, exactly
-- as configured, e.g. FOR TABLE public.conversations WHERE (role <> 'system'); with
-- create_if_missing: false the bridge stops if the publication's filter differs.
-- A filter may use only replica identity columns, or PostgreSQL refuses the table's
-- UPDATEs and DELETEs. The bridge never drops tables from a publication made here; it
-- does from its own, which it marks with COMMENT ON PUBLICATION (see the README,
-- "Filters and masking").
CREATE PUBLICATION cdc_bridge FOR TABLE public.conversations
    WITH (publish_via_partition_root = true);

-- 5. The slot (postgres.slot): the bridge's position in the WAL.
--
-- Create it after the publication: pgoutput looks the publication up as of each
-- change's position in the WAL, so changes the slot decodes from before the publication
-- existed are skipped (PostgreSQL 18 says only "WARNING: skipped loading publication";
-- older versions stop with "publication does not exist"). The slot starts at the
-- current WAL position; every change committed from then on reaches the bridge, even
-- while it is not running yet.
--
-- A slot pins WAL until the bridge confirms it: a slot nobody reads fills the disk.
-- Create it when the bridge is about to run, watch pg_replication_slots, and consider
-- max_slot_wal_keep_size (past it the slot is invalidated and changes are lost; the
-- bridge then refuses to start).
SELECT pg_create_logical_replication_slot('cdc_bridge', 'pgoutput');

-- 6. Check.
SELECT pubname, schemaname, tablename FROM pg_publication_tables WHERE pubname = 'cdc_bridge';
SELECT slot_name, plugin, database, confirmed_flush_lsn
FROM pg_replication_slots
WHERE slot_name = 'cdc_bridge';
