-- 1 once sandbox mode has served this database: its fixtures (a merchant
-- whose secret is published, a token, a coupon) and its moved clock are in
-- it for good, so it must not be served outside sandbox mode. A database
-- that already holds the sandbox merchant was used so before this column.
ALTER TABLE sandbox_clock ADD COLUMN used BIGINT NOT NULL DEFAULT 0;
UPDATE sandbox_clock SET used = 1
 WHERE EXISTS (SELECT 1 FROM mbk_merchants WHERE mid = 'MBK9006');
