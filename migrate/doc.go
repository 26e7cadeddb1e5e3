// Package migrate will move a running job between hosts: the serve/migrate
// protocol, stop-copy, post-copy and pre-copy modes, and the handover that
// keeps exactly one copy of the job running (issue "Live migration").
package migrate
