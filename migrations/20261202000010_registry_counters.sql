-- Kept counts of jobs and checkpoint records (issue 15): the GCS's resource property document
-- (JobCount, CheckpointCount), which brokers may poll, reads 64 small rows instead of counting
-- every record. Triggers keep them in the transaction of each insert, delete and truncate, so a count
-- is exactly what is committed. The counts are split over 64 slots, each transaction adding to
-- the slot of its backend (pg_backend_pid() % 64): one transaction touches one slot row, and
-- concurrent registrations on other connections rarely wait for each other's slot.

create table registry_counters (
    slot        integer primary key check (slot >= 0 and slot < 64),
    jobs        bigint not null default 0,
    checkpoints bigint not null default 0
);

-- Exact at the time of the migration: no job or record is written meanwhile.
lock table jobs, checkpoints in share mode;

insert into registry_counters (slot) select generate_series(0, 63);
update registry_counters set
    jobs = (select count(*) from jobs),
    checkpoints = (select count(*) from checkpoints)
where slot = 0;

-- Statement-level triggers over the transition tables: one counter update per statement,
-- whatever number of rows it inserted or deleted (none when it wrote no row, e.g. an
-- `on conflict do nothing` that found the row).
create function registry_counters_add() returns trigger language plpgsql as $$
declare
    delta bigint;
begin
    if tg_op = 'INSERT' then
        select count(*) into delta from new_rows;
    else
        select -count(*) into delta from old_rows;
    end if;
    if delta <> 0 then
        if tg_table_name = 'jobs' then
            update registry_counters set jobs = jobs + delta where slot = pg_backend_pid() % 64;
        else
            update registry_counters set checkpoints = checkpoints + delta
            where slot = pg_backend_pid() % 64;
        end if;
    end if;
    return null;
end;
$$;

create function registry_counters_truncate() returns trigger language plpgsql as $$
begin
    if tg_table_name = 'jobs' then
        update registry_counters set jobs = 0;
    else
        update registry_counters set checkpoints = 0;
    end if;
    return null;
end;
$$;

create trigger jobs_count_insert after insert on jobs
    referencing new table as new_rows
    for each statement execute function registry_counters_add();
create trigger jobs_count_delete after delete on jobs
    referencing old table as old_rows
    for each statement execute function registry_counters_add();
create trigger checkpoints_count_insert after insert on checkpoints
    referencing new table as new_rows
    for each statement execute function registry_counters_add();
create trigger checkpoints_count_delete after delete on checkpoints
    referencing old table as old_rows
    for each statement execute function registry_counters_add();
create trigger jobs_count_truncate after truncate on jobs
    for each statement execute function registry_counters_truncate();
create trigger checkpoints_count_truncate after truncate on checkpoints
    for each statement execute function registry_counters_truncate();
