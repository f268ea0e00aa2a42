-- Compatibility before restore (issue 13): the facts a restore of each checkpoint depends on
-- (architecture, kernel, CRIU version, CPU features, executable, mapped and open files; part
-- of the signed record), and the facts each CTS reports about its resource when it registers.
-- Both null for rows written before (their verdict is `unknown`).

alter table checkpoints add column facts jsonb;

alter table cts_instances add column facts jsonb;
