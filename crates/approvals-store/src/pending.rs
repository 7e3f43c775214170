//! Lists whose filter only the domain can evaluate (`pending_for_me`: requests the caller could
//! approve now), scanned in id order over the rows the SQL filter narrows them to.

use approvals_domain::{ChangeRequest, RequestFilter};
use sea_orm::{
    ConnectionTrait,
    sea_query::{Expr, ExprTrait, Order, Query},
};

use crate::{
    ListPage, Store, TOTAL_SIZE_EXACT_LIMIT,
    codec::decode_request,
    error::StoreError,
    list::apply_filter,
    schema::{CHANGE_REQUESTS, cr},
};

/// Rows read from the database per round trip while scanning.
const SCAN_BATCH: u64 = 200;

/// Where a scan stopped.
struct Scanned {
    /// The id of the last row read.
    last: Option<String>,
    /// Every matching row was read.
    exhausted: bool,
}

impl Store {
    /// Like [`Store::list`], keeping only the requests `keep` accepts. A page reads at most
    /// [`TOTAL_SIZE_EXACT_LIMIT`] rows; a short page then still has a `next_after`, so paging
    /// always progresses. `total_size` counts the accepted requests among the first
    /// [`TOTAL_SIZE_EXACT_LIMIT`] rows, plus the SQL count (an upper bound) of the rest.
    pub async fn list_matching(
        &self,
        filter: &RequestFilter,
        keep: impl Fn(&ChangeRequest) -> bool + Send + Sync,
        after: Option<&str>,
        page_size: u64,
    ) -> Result<ListPage, StoreError> {
        let mut change_requests = Vec::new();
        let scanned = self
            .scan(filter, after, |request| {
                if keep(&request) {
                    change_requests.push(request);
                }
                change_requests.len() as u64 <= page_size
            })
            .await?;
        let next_after = if change_requests.len() as u64 > page_size {
            change_requests.truncate(page_size as usize);
            change_requests.last().map(|r| r.id.clone())
        } else if scanned.exhausted {
            None
        } else {
            scanned.last
        };

        let mut total_size: i64 = 0;
        let counted = self
            .scan(filter, None, |request| {
                if keep(&request) {
                    total_size += 1;
                }
                true
            })
            .await?;
        if !counted.exhausted {
            total_size += self
                .list(filter, counted.last.as_deref(), 0)
                .await?
                .total_size;
        }
        Ok(ListPage {
            change_requests,
            next_after,
            total_size,
        })
    }

    /// Reads matching rows newest first after `after`, at most [`TOTAL_SIZE_EXACT_LIMIT`] of
    /// them, until `visit` returns false.
    async fn scan(
        &self,
        filter: &RequestFilter,
        after: Option<&str>,
        mut visit: impl FnMut(ChangeRequest) -> bool + Send,
    ) -> Result<Scanned, StoreError> {
        let mut last = after.map(str::to_owned);
        let mut read: i64 = 0;
        loop {
            let mut query = Query::select();
            query
                .columns([cr::ID, cr::REVISION, cr::BODY])
                .from(CHANGE_REQUESTS);
            apply_filter(&mut query, filter);
            if let Some(last) = &last {
                query.and_where(Expr::col(cr::ID).lt(last.as_str()));
            }
            query.order_by(cr::ID, Order::Desc).limit(SCAN_BATCH);
            let rows = self.db.query_all(&query).await?;
            let batch = rows.len() as u64;
            for row in &rows {
                let request = decode_request(row)?;
                last = Some(request.id.clone());
                read += 1;
                if !visit(request) {
                    return Ok(Scanned {
                        last,
                        exhausted: false,
                    });
                }
                if read >= TOTAL_SIZE_EXACT_LIMIT {
                    return Ok(Scanned {
                        last,
                        exhausted: false,
                    });
                }
            }
            if batch < SCAN_BATCH {
                return Ok(Scanned {
                    last,
                    exhausted: true,
                });
            }
        }
    }
}
