-- At most one open OTP per merchant and cell, whichever node issues it. On
-- PostgreSQL two OTPs issued at once on two writers each closed only the
-- OTPs committed before it, and both stayed open. Earlier duplicates keep
-- their newest.
UPDATE mbk_otps SET state = 2
 WHERE state = 0
   AND id NOT IN (SELECT MAX(id) FROM mbk_otps WHERE state = 0 GROUP BY mid, cell);
CREATE UNIQUE INDEX mbk_otps_one_open ON mbk_otps (mid, cell) WHERE state = 0;
