-- 1 once a server outside sandbox mode has served this database. Sandbox
-- mode must not serve it after that: it would write its fixtures (a merchant
-- whose secret is published) into a live ledger, and show the OTPs in its
-- outbox to the published sandbox admin token. A database with accounts that
-- sandbox mode never served was served so before this column.
ALTER TABLE sandbox_clock ADD COLUMN production INTEGER NOT NULL DEFAULT 0;
UPDATE sandbox_clock SET production = 1
 WHERE used = 0 AND EXISTS (SELECT 1 FROM accounts);
