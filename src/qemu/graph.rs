//! QEMU's block graph (`x-debug-query-block-graph`): which node sits under
//! which, and who holds what permission on a node. Decoded leniently, like
//! every reply: unknown fields are ignored.

use std::collections::{HashMap, HashSet};

use serde::Deserialize;
use serde_json::Value;

use crate::qmp::{self, Qmp};

#[derive(Debug, Default, Deserialize)]
pub struct Graph {
    nodes: Vec<GraphNode>,
    edges: Vec<GraphEdge>,
}

#[derive(Debug, Deserialize)]
struct GraphNode {
    id: u64,
    #[serde(rename = "type")]
    kind: String,
    name: String,
}

#[derive(Debug, Deserialize)]
struct GraphEdge {
    parent: u64,
    child: u64,
    name: String,
    #[serde(default)]
    perm: Vec<String>,
}

/// The graph, or `None` when this QEMU has no such command.
pub async fn query(qmp: &Qmp) -> qmp::Result<Option<Graph>> {
    match qmp
        .execute_raw("x-debug-query-block-graph", Value::Null)
        .await
    {
        Ok(value) => {
            serde_json::from_value(value)
                .map(Some)
                .map_err(|source| qmp::Error::UnexpectedReply {
                    command: "x-debug-query-block-graph".into(),
                    source,
                })
        }
        Err(e) if e.is_command_not_found() => Ok(None),
        Err(e) => Err(e),
    }
}

impl Graph {
    fn driver_node_id(&self, name: &str) -> Option<u64> {
        self.nodes
            .iter()
            .find(|n| n.kind == "block-driver" && n.name == name)
            .map(|n| n.id)
    }

    fn node(&self, id: u64) -> Option<&GraphNode> {
        self.nodes.iter().find(|n| n.id == id)
    }

    fn node_name(&self, id: u64) -> Option<&str> {
        self.node(id).map(|n| n.name.as_str())
    }

    /// Nodes that are never a volume of their own: those under another
    /// driver node (a format's file, a backing image, a filter's child) and
    /// a job's target.
    pub fn children(&self) -> HashSet<&str> {
        let kind: HashMap<u64, &str> = self.nodes.iter().map(|n| (n.id, n.kind.as_str())).collect();
        self.edges
            .iter()
            .filter(|e| match kind.get(&e.parent) {
                Some(&"block-driver") => true,
                Some(&"block-job") => e.name == "target",
                _ => false,
            })
            .filter_map(|e| self.node_name(e.child))
            .collect()
    }

    /// The node under `node`'s `file` edge.
    pub fn file_child(&self, node: &str) -> Option<&str> {
        self.child(node, "file")
    }

    /// The node under `node`'s edge named `role` (`file`, `backing`).
    pub fn child(&self, node: &str, role: &str) -> Option<&str> {
        let id = self.driver_node_id(node)?;
        self.edges
            .iter()
            .find(|e| e.parent == id && e.name == role)
            .and_then(|e| self.node_name(e.child))
    }

    /// The parents of node `name` that hold the write permission on it:
    /// (kind, name), kind being `block-backend` (a device's, named by its
    /// QOM path, or an export's, unnamed), `block-job` or `block-driver`.
    pub fn writers(&self, name: &str) -> Vec<(&str, &str)> {
        let Some(id) = self.driver_node_id(name) else {
            return Vec::new();
        };
        self.edges
            .iter()
            .filter(|e| e.child == id && e.perm.iter().any(|p| p == "write"))
            .filter_map(|e| self.node(e.parent))
            .map(|n| (n.kind.as_str(), n.name.as_str()))
            .collect()
    }
}
