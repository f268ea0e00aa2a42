-- Notifications are delivered without a transaction held across the POST (issue 15): a replica
-- claims the first undelivered notification of a subscription for a lease (`lease` identifies
-- the claim, `leased_until` ends it), POSTs, and then deletes the row or records the failure,
-- both only if its lease is still the row's. A replica that dies mid-POST leaves the lease to
-- run out, and the notification is sent again (at least once). Expand-only: an older replica
-- ignores the columns (and, holding its row locks, is still skipped by newer ones).
alter table notifications add column lease uuid;
alter table notifications add column leased_until timestamptz;
