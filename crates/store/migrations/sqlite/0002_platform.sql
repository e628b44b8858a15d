-- A value sealed with the master key at first start: opening it proves that
-- the configured key is the one this database's secrets are sealed with.
CREATE TABLE key_check (
    id     INTEGER PRIMARY KEY CHECK (id = 1),
    sealed BLOB    NOT NULL
);

-- State the sandbox keeps, in the database so that every node agrees.

CREATE TABLE sandbox_clock (
    id        INTEGER PRIMARY KEY CHECK (id = 1),
    offset_ms INTEGER NOT NULL
);
INSERT INTO sandbox_clock (id, offset_ms) VALUES (1, 0);

-- SMS-like messages the server has "sent" (OTPs). Text and OTP are sealed
-- with the master key; only the recipient is readable.
CREATE TABLE outbox_messages (
    id          INTEGER PRIMARY KEY,
    recipient   TEXT    NOT NULL,
    text_sealed BLOB    NOT NULL,
    otp_sealed  BLOB,
    sent_at     INTEGER NOT NULL
);
CREATE INDEX outbox_messages_by_recipient ON outbox_messages (recipient, id);
