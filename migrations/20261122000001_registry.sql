-- The GCS registry: checkpointer classes, CTS types and instances, jobs, checkpoint records.
-- Applied by `gcs` at start-up and by `gcs migrate`. Never edit a migration once landed:
-- add a new one.

create table checkpointer_classes (
    name        text primary key,
    description text,
    -- [{"name": ..., "value": ...}] sorted by name: the properties every member must have.
    properties  jsonb not null default '[]',
    builtin     boolean not null default false,
    created_at  timestamptz not null default now()
);

insert into checkpointer_classes (name, description, properties, builtin) values (
    'basic',
    'One process, one thread, input and output in regular files, no network or other IPC (GCA paper 5.4).',
    '[{"name": "io", "value": "regular-files"},
      {"name": "ipc", "value": "none"},
      {"name": "network", "value": "none"},
      {"name": "processes", "value": "single"},
      {"name": "threads", "value": "single"}]',
    true
);

create table cts_types (
    name                      text primary key,
    core_service              text not null,
    -- The validated descriptor as JSON (the canonical form compared on re-registration)...
    descriptor                jsonb not null,
    -- ...and the document as the admin registered it.
    descriptor_xml            text not null,
    -- Core-service properties plus the capability flags, as one object, for @> matching.
    properties                jsonb not null,
    external_checkpoints      boolean not null,
    internal_checkpoints      boolean not null,
    recover_on_other_resource boolean not null,
    recover_from_any_image    boolean not null,
    registered_at             timestamptz not null default now()
);
create index cts_types_core_service_idx on cts_types (core_service);
create index cts_types_properties_idx on cts_types using gin (properties jsonb_path_ops);

create table cts_type_classes (
    cts_type text not null references cts_types (name) on delete cascade,
    class    text not null references checkpointer_classes (name),
    primary key (cts_type, class)
);
create index cts_type_classes_class_idx on cts_type_classes (class);

create table cts_instances (
    name              text primary key,
    cts_type          text not null constraint cts_instances_cts_type_fkey references cts_types (name),
    url               text not null,
    execution_manager text not null,
    resource          text not null,
    registered_at     timestamptz not null default now(),
    last_seen         timestamptz not null default now()
);
create index cts_instances_cts_type_idx on cts_instances (cts_type);
create index cts_instances_resource_idx on cts_instances (resource);

-- GID -> CTS routing. cts_instance is deliberately not a foreign key: the job keeps the name of
-- the CTS that last ran it after that instance is unregistered.
create table jobs (
    gid              text primary key,
    cts_instance     text not null,
    cts_type         text not null,
    local_id         text,
    state            text not null check (state in ('running', 'recovering', 'stopped', 'finished')),
    registered_at    timestamptz not null default now(),
    updated_at       timestamptz not null default now(),
    -- The last sequence number assigned: gapless, bumped under this row's lock.
    checkpoint_count bigint not null default 0,
    latest_checkpoint text,
    recoveries       bigint not null default 0,
    exit_status      integer,
    signal           integer
);
create index jobs_cts_instance_idx on jobs (cts_instance);
create index jobs_state_idx on jobs (state);

create table checkpoints (
    id                text primary key,
    gid               text not null references jobs (gid),
    sequence          bigint not null,
    cts_name          text not null,
    cts_type          text not null,
    taken_at          timestamptz not null,
    image_name        text not null,
    execution_manager text not null,
    size_bytes        bigint,
    digest            text,
    parent            text,
    origin            text not null check (origin in ('external', 'periodic', 'job')),
    job_stopped       boolean not null default false,
    registered_at     timestamptz not null default now(),
    -- Also the index behind "checkpoints of a GID in order" and "latest checkpoint of a GID".
    constraint checkpoints_gid_sequence_key unique (gid, sequence)
);
