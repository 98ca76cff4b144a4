-- Whether a node's chain has carried an HMAC (hmac_sha256): from then on a
-- record without one was rewritten by someone without the node's key. Kept
-- beside the head so storing a record needs no look-up in `audit`.
ALTER TABLE audit_heads ADD COLUMN keyed BOOLEAN NOT NULL DEFAULT FALSE;

-- Nodes whose stored records are keyed already, found in one pass over
-- `audit`. The records are compact JSON (serde_json), so a top-level
-- `"hmac_sha256":` key appears as that exact text; a JSON string holding it
-- would have its quotes escaped.
UPDATE audit_heads SET keyed = TRUE
WHERE node IN (SELECT DISTINCT node FROM audit WHERE record LIKE '%"hmac_sha256":%');
