-- The retention policy of checkpoint images (XtreemOS: by default the images of a job are
-- deleted when it ends; its owner can keep the last N, or all, in a directory the owner names).
--
-- A job "ends" for retention when it finishes with exit status 0 or its WS-Resource is
-- destroyed (Destroy, or its termination time passing). A job that fails is not ended: its
-- images are what recovers it. It gets a termination time instead (`failed_job_lifetime_secs`)
-- unless it has one, so its images go when nobody recovered it in time.

alter table jobs add column keep text not null default 'none'
    check (keep in ('none', 'last', 'all'));
alter table jobs add column keep_last integer check (keep_last > 0);
alter table jobs add column keep_in text;
-- When the policy was last applied (the job ended); null: not yet.
alter table jobs add column retention_applied_at timestamptz;
-- The termination time was set by the GCS because the job failed (cleared when it is
-- recovered); an owner's own termination time is never touched.
alter table jobs add column termination_on_failure boolean not null default false;

alter table checkpoints add column image_state text not null default 'stored'
    check (image_state in ('stored', 'deleting', 'deleted', 'keeping', 'kept', 'failed'));
alter table checkpoints add column kept_in text;
alter table checkpoints add column image_error text;
create index checkpoints_gid_image_state_idx on checkpoints (gid, image_state);

-- Image tasks still to carry out on the CTSes: at most one per checkpoint. Like notifications,
-- every GCS replica works from this table, claiming rows with `for update skip locked`.
create table image_tasks (
    checkpoint_id   text primary key references checkpoints (id),
    action          text not null check (action in ('delete', 'keep')),
    -- With keep: the owner's directory.
    keep_in         text,
    created_at      timestamptz not null default now(),
    attempts        integer not null default 0,
    next_attempt_at timestamptz not null default now(),
    last_error      text
);
create index image_tasks_due_idx on image_tasks (next_attempt_at);
