"""Federation: the bundle endpoint we serve, relationships with foreign trust domains,
the refresher that fetches their bundles, and OIDC discovery for JWT-SVIDs."""
