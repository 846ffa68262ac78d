-- cdc-bridge: remove what sql/setup.sql (or `cdc-bridge run`) created.
--
-- Stop the bridge first: an active slot cannot be dropped. Run connected to the
-- application database as a superuser (on RDS: the master user) or the table owner:
--
--     psql -v ON_ERROR_STOP=1 -d app -f sql/teardown.sql
--
-- Each step is skipped when its object is already gone, so the script can be re-run.
-- The JetStream stream is not touched (nats stream rm conversational-memory).

-- 1. The slot.
--
-- WARNING: this loses the bridge's position. The WAL the slot retained is freed, and a
-- new slot starts at the then current WAL position: changes committed while no slot
-- exists are never streamed (a snapshot would be needed to catch up).
SELECT pg_drop_replication_slot(slot_name)
FROM pg_replication_slots
WHERE slot_name = 'cdc_bridge';

-- 2. The publication.
DROP PUBLICATION IF EXISTS cdc_bridge;

-- Optional: back to logging only the primary key of old rows (less WAL).
--     ALTER TABLE public.conversations REPLICA IDENTITY DEFAULT;

-- 3. The role. DROP OWNED revokes its privileges (and drops anything it owns) in this
-- database; if it was granted privileges in other databases, run it there too, or
-- DROP ROLE fails and names them.
DO $$
BEGIN
    IF EXISTS (SELECT FROM pg_roles WHERE rolname = 'cdc_bridge') THEN
        EXECUTE 'DROP OWNED BY cdc_bridge';
    END IF;
END
$$;
DROP ROLE IF EXISTS cdc_bridge;
