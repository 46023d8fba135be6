//! The browser client: static files compiled into the binary.
//!
//! Plain HTML, CSS and JavaScript with no build step and nothing fetched
//! from elsewhere, so the page works offline and the binary is the whole
//! deployment. Each file has a strong `ETag` (a hash of its bytes), so a
//! browser revalidates cheaply and sees a new version as soon as the server
//! is upgraded.

use std::sync::LazyLock;

/// One embedded file.
#[derive(Debug)]
pub(crate) struct Asset {
    /// The request path that serves it.
    pub path: &'static str,
    /// Its `Content-Type`.
    pub content_type: &'static str,
    /// Its bytes.
    pub body: &'static [u8],
}

/// Every file of the web client.
pub(crate) static ASSETS: &[Asset] = &[
    Asset {
        path: "/",
        content_type: "text/html; charset=utf-8",
        body: include_bytes!("../../web/index.html"),
    },
    Asset {
        path: "/app.js",
        content_type: "text/javascript; charset=utf-8",
        body: include_bytes!("../../web/app.js"),
    },
    Asset {
        path: "/style.css",
        content_type: "text/css; charset=utf-8",
        body: include_bytes!("../../web/style.css"),
    },
    Asset {
        path: "/icon.svg",
        content_type: "image/svg+xml",
        body: include_bytes!("../../web/icon.svg"),
    },
];

/// The `Content-Security-Policy` of the page: everything from this server,
/// nothing inline, nothing from elsewhere. Even if some text were ever
/// rendered as HTML, no injected script could run.
pub(crate) const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; \
     style-src 'self'; img-src 'self'; connect-src 'self'; base-uri 'none'; \
     form-action 'none'; frame-ancestors 'none'";

static ETAGS: LazyLock<Vec<String>> = LazyLock::new(|| {
    ASSETS
        .iter()
        .map(|a| format!("\"{}\"", &blake3::hash(a.body).to_hex()[..20]))
        .collect()
});

impl Asset {
    /// The asset served at `path`, if any.
    pub(crate) fn find(path: &str) -> Option<(&'static Asset, &'static str)> {
        let i = ASSETS.iter().position(|a| a.path == path)?;
        Some((&ASSETS[i], ETAGS[i].as_str()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn assets_are_found_with_distinct_etags() {
        let (page, tag) = Asset::find("/").expect("page");
        assert!(page.content_type.starts_with("text/html"));
        assert!(tag.starts_with('"') && tag.ends_with('"'));
        assert!(Asset::find("/nope").is_none());
        let mut tags: Vec<&str> = ASSETS
            .iter()
            .map(|a| Asset::find(a.path).expect("listed").1)
            .collect();
        tags.sort_unstable();
        tags.dedup();
        assert_eq!(tags.len(), ASSETS.len());
    }

    #[test]
    fn the_page_loads_nothing_from_elsewhere() {
        for asset in ASSETS {
            let text = std::str::from_utf8(asset.body).expect("utf-8");
            let external = text
                .replace("http://www.w3.org/2000/svg", "")
                .contains("://");
            assert!(!external, "{} refers to another site", asset.path);
            // Inline scripts would be blocked by the CSP anyway.
            assert!(
                !text.contains("<script>"),
                "{} has an inline script",
                asset.path
            );
        }
    }
}
