-- Sent messages are pruned by age (`outbox::prune`), oldest first.
CREATE INDEX outbox_messages_by_sent_at ON outbox_messages (sent_at);
