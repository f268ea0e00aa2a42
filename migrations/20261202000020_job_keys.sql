-- Per-job image keys (issue 12): the key a job's chunks are encrypted with in the object
-- store. The GCS keeps it wrapped (AES-256-GCM under its key-wrapping key, the GID as
-- associated data), and hands it out only to the CTS the job is on (GetJobKey). A job's key
-- goes with the job: what is left of its chunks in a bucket is unreadable without it.
create table job_keys (
    gid        text primary key references jobs (gid) on delete cascade,
    wrapped    bytea not null,
    created_at timestamptz not null default now()
);
