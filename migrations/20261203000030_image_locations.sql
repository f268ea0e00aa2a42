-- Image locations (issue 12): every place a checkpoint's image is. The CTS that took it
-- (its instance name; `url` the image's URL there, the record's image name) and, when its
-- type's durability is `replicated` or `async`, the object store it went to (`name`: the
-- bucket's identity as the CTS configures it, never a secret). The object store's row follows
-- the upload: `pending` (async, under way), `stored`, or `failed` (`error` says why), with
-- when it last changed. The CTS that registered the record (or the one its job is on now)
-- reports the change (SetImageLocation).

create table checkpoint_locations (
    checkpoint_id text not null references checkpoints (id) on delete cascade,
    kind          text not null check (kind in ('cts', 'object-store')),
    name          text not null,
    url           text,
    state         text not null check (state in ('pending', 'stored', 'failed')),
    error         text,
    updated_at    timestamptz not null default now(),
    -- The order locations were first listed in (the taking CTS first).
    position      integer not null default 0,
    primary key (checkpoint_id, kind, name)
);

-- Records registered before this migration: their image is in the store of the CTS that took
-- them (wherever the retention policy has not moved it).
insert into checkpoint_locations (checkpoint_id, kind, name, url, state, updated_at)
select id, 'cts', cts_name, image_name, 'stored', registered_at from checkpoints;
