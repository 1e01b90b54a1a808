-- phase: expand
-- Shard API endpoints are plain `http://`: the gateway has no TLS client, so a request to an
-- `https://` endpoint can only fail. The shard-map file check refuses them; this makes the
-- catalog refuse them too, also when written by hand. NOT VALID: rows already there are not
-- checked (such an endpoint never worked; `tenantry admin shard apply` with a corrected file
-- replaces it), so the step cannot fail on an existing catalog.
ALTER TABLE shard_endpoints
    ADD CONSTRAINT shard_endpoints_plain_http CHECK (url ~ '^http://') NOT VALID;
