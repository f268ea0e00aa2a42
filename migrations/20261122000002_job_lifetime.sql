-- WS-ResourceLifetime on job resources: a scheduled termination time (null: none) and the
-- time the job resource was destroyed (Destroy, or its termination time passing). A destroyed
-- job is finished; its record stays for bookkeeping, but its WS-Resource is gone.
alter table jobs add column termination_time timestamptz;
alter table jobs add column destroyed_at timestamptz;
create index jobs_termination_due_idx on jobs (termination_time)
    where termination_time is not null and destroyed_at is null;
